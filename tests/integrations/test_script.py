"""Patched models keep what the unpatched ones can do: TorchScript, timm's own model checks,
torch.fx and torch.compile.

- Scripted patched timm ViTs (1 and 4 prefix tokens, with and without ``patch_drop_rate``) and open_clip
  ViT-B-32 (``create_model(..., jit=True)``) equal the unpatched scripted models, in eval mode and with
  patch dropout under the same seed. ``masking`` refuses a scripted model, and scripting inside a
  ``masking`` block is refused.
- timm's ``tests/test_models.py`` (not installed with timm) on patched ViTs, at 64 px instead of
  timm's 96-384 px targets:
  ``test_model_forward`` (eval, batch 1: output batch size, no NaN);
  ``test_model_backward`` (train, num_classes=42, batch 2: ``outputs.mean().backward()`` gives every
  parameter a gradient, output width 42, no NaN);
  ``test_model_forward_torchscript`` (``set_scriptable(True)``, eval, ``torch.jit.script``: batch
  size, no NaN);
  ``test_model_forward_intermediates`` (eval: one NCHW intermediate per ``feature_info`` entry with its
  channels, spatial size <= ceil(size / reduction) + 1, batch size, no NaN; the final output allclose
  ``forward_features``, and again with grad checkpointing);
  ``test_model_forward_fx`` (eval: the traced GraphModule's output equals the model's).
- Under ``masking``: torch.fx refuses to trace the masked forward (the graph would keep one step's
  scores) and, with AttentivePatchDropout as a leaf module, the GraphModule masks like the model;
  torch.compile(fullgraph=True) masks like eager (forward and backward), without recompiling for new
  scores; leaving masking mode recompiles once.
"""
import copy
import math

import pytest
import torch

import aclip_kernels as ak

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

# torch deprecates torch.jit.script (a DeprecationWarning in 2.11, a FutureWarning in 2.14); scripting
# is what these tests check, for as long as torch has it.
pytestmark = [pytest.mark.filterwarnings(f"ignore:`torch.jit.script` is deprecated:{category}")
              for category in ("DeprecationWarning", "FutureWarning")]

SIZE = 64                                               # 4x4 patches of 16 px
TIMM_VITS = ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "vit_little_patch16_reg4_gap_256"]


def _images(batch, seed=0):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _timm_pair(name, **kwargs):
    """(unpatched, patched) copies of one randomly initialised timm model at SIZE, 2 blocks deep."""
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, img_size=SIZE, depth=2, **kwargs)
    return reference, ak.patch_timm_vit(copy.deepcopy(reference))


def _same_outputs(reference, patched, x, seed=3):
    """Both modules give bit-identical outputs in eval mode and, under one seed, in training mode."""
    with torch.no_grad():
        assert torch.equal(patched.eval()(x), reference.eval()(x))
        torch.manual_seed(seed)
        expected = reference.train()(x)
        torch.manual_seed(seed)
        assert torch.equal(patched.train()(x), expected)
    return expected


@pytest.mark.parametrize("name,kwargs", [("vit_tiny_patch16_224", {}),
                                         ("vit_little_patch16_reg4_gap_256", {"patch_drop_rate": 0.25})])
def test_scripted_patched_timm_vit_equals_the_unpatched_scripted(name, kwargs):
    reference, patched = _timm_pair(name, **kwargs)
    scripted_ref, scripted = torch.jit.script(reference), torch.jit.script(patched)
    assert scripted.patch_drop.original_name == "AttentivePatchDropout"
    assert scripted.patch_drop.num_prefix_tokens == reference.num_prefix_tokens
    x = _images(2)
    dropped = _same_outputs(scripted_ref, scripted, x)
    if kwargs:
        with torch.no_grad():                            # the dropout really ran
            assert not torch.equal(dropped, scripted_ref.eval()(x))
    with pytest.raises(RuntimeError, match="eager-only"):
        with ak.masking(scripted, scores=torch.rand(2, 16)):
            pass


def test_scripted_patch_dropout_with_indices_equals_timms():
    reference = timm.layers.PatchDropoutWithIndices(0.5, num_prefix_tokens=2, ordered=True)
    patched = ak.AttentivePatchDropout.from_timm(reference, 2)
    assert isinstance(patched, ak.AttentivePatchDropoutWithIndices)
    scripted_ref, scripted = torch.jit.script(reference).train(), torch.jit.script(patched).train()
    x = torch.randn(3, 2 + 16, 8)
    for seed in range(3):
        torch.manual_seed(seed)
        want = scripted_ref(x)
        torch.manual_seed(seed)
        got = scripted(x)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert scripted.eval()(x)[1] is None


def test_open_clip_create_model_jit_scripts_the_patched_model(monkeypatch):
    """open_clip falls back to eager when scripting fails: the patched model must come back scripted."""
    def create():
        torch.manual_seed(0)
        return open_clip.create_model("ViT-B-32", pretrained=None, jit=True, force_patch_dropout=0.5,
                                      force_image_size=SIZE)

    reference = create()
    init = open_clip.transformer.VisionTransformer.__init__

    def patched_init(self, *args, **kwargs):            # every tower create_model builds is patched
        init(self, *args, **kwargs)
        ak.patch_open_clip(self)

    monkeypatch.setattr(open_clip.transformer.VisionTransformer, "__init__", patched_init)
    patched = create()
    assert isinstance(reference, torch.jit.ScriptModule) and isinstance(patched, torch.jit.ScriptModule)
    assert patched.visual.patch_dropout.original_name == "AttentivePatchDropout"
    assert reference.visual.patch_dropout.original_name == "PatchDropout"
    _same_outputs(reference.visual, patched.visual, _images(2, seed=1))
    with pytest.raises(RuntimeError, match="eager-only"):
        with ak.masking(patched, scores=torch.rand(2, 4)):
            pass


def test_scripting_inside_a_masking_block_is_refused():
    _, model = _timm_pair("vit_tiny_patch16_224")
    with ak.masking(model.train(), scores=torch.rand(2, 16)):
        with pytest.raises(RuntimeError, match="inside a masking block"):
            torch.jit.script(model)


# timm's tests/test_models.py, on patched ViTs

@pytest.mark.parametrize("name", TIMM_VITS)
def test_timm_model_forward(name):
    model = ak.patch_timm_vit(timm.create_model(name, pretrained=False, img_size=SIZE)).eval()
    outputs = model(_images(1))
    assert outputs.shape[0] == 1 and not torch.isnan(outputs).any()


@pytest.mark.parametrize("name,kwargs", [(n, {}) for n in TIMM_VITS] + [(TIMM_VITS[0], {"patch_drop_rate": 0.5})])
def test_timm_model_backward(name, kwargs):
    model = ak.patch_timm_vit(timm.create_model(name, pretrained=False, img_size=SIZE, num_classes=42, **kwargs))
    model.train()
    outputs = model(_images(2))
    outputs.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"
    assert outputs.shape[-1] == 42 and not torch.isnan(outputs).any()


@pytest.mark.parametrize("name", TIMM_VITS)
def test_timm_model_forward_torchscript(name):
    with timm.set_scriptable(True):
        model = ak.patch_timm_vit(timm.create_model(name, pretrained=False, img_size=SIZE))
    model = torch.jit.script(model.eval())
    outputs = model(_images(1))
    assert outputs.shape[0] == 1 and not torch.isnan(outputs).any()


@pytest.mark.parametrize("name", TIMM_VITS)
def test_timm_model_forward_intermediates(name):
    model = ak.patch_timm_vit(timm.create_model(name, pretrained=False, img_size=SIZE)).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    x = _images(1)
    output, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
    assert len(intermediates) == len(info.channels())
    for c, r, o in zip(info.channels(), info.reduction(), intermediates):
        assert o.shape[1] == c and o.shape[0] == 1 and not torch.isnan(o).any()
        assert o.shape[2] <= math.ceil(SIZE / r) + 1 and o.shape[3] <= math.ceil(SIZE / r) + 1
    assert torch.allclose(output, model.forward_features(x))
    model.set_grad_checkpointing()
    assert torch.allclose(output, model.forward_intermediates(x, output_fmt="NCHW")[0], rtol=1e-4, atol=1e-5)


def test_timm_model_forward_fx():
    reference, patched = _timm_pair("vit_tiny_patch16_224")
    x = _images(1)
    with torch.no_grad():
        outputs = patched.eval()(x)
        assert torch.equal(torch.fx.symbolic_trace(patched)(x), outputs)
        assert torch.equal(outputs, reference.eval()(x))


# under masking

class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, name):
        return isinstance(m, ak.AttentivePatchDropout) or super().is_leaf_module(m, name)


def test_fx_refuses_a_masked_trace_and_keeps_a_leaf_patched_module():
    _, model = _timm_pair("vit_tiny_patch16_224")
    model.train()
    scores, x = torch.rand(2, 16), _images(2)
    with ak.masking(model, scores=scores, keep=0.5):
        with pytest.raises(RuntimeError, match="torch.fx cannot trace a masked forward"):
            torch.fx.symbolic_trace(model)
    assert not any(isinstance(m, ak.AttentivePatchDropout) for m in torch.fx.symbolic_trace(model).modules())
    graph = torch.fx.GraphModule(model, _LeafTracer().trace(model))
    with torch.no_grad():
        with ak.masking(model, scores=scores, keep=0.5):
            expected = model(x)
        with ak.masking(graph, scores=scores, keep=0.5) as state:
            got = graph(x)
    assert state.tokens == 1 + 8 and torch.equal(got, expected)


def test_torch_compile_masks_like_eager_without_recompiling():
    torch._dynamo.reset()
    _, model = _timm_pair("vit_tiny_patch16_224")
    model.train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    frames = torch._dynamo.utils.counters["stats"]
    start = frames["unique_graphs"]  # counted since the process began, whatever reset() clears
    x = _images(2)
    for step in range(3):                                # new scores every step: the same graph
        scores = torch.rand(2, 16, generator=torch.Generator().manual_seed(step))
        with ak.masking(model, scores=scores, keep=0.5, block=2) as state:
            expected = model(x)
            expected.sum().backward()
            grad = model.patch_embed.proj.weight.grad.clone()
            model.zero_grad()
            got = compiled(x)
            got.sum().backward()
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(model.patch_embed.proj.weight.grad, grad)
        model.zero_grad()
        assert state.calls == 2 and state.tokens == 1 + 8 and state.indices.shape == (2, 8)
    assert frames["unique_graphs"] - start == 1
    with torch.no_grad():                                # leaving masking mode: one recompile
        assert torch.equal(compiled(x), model(x))
    assert frames["unique_graphs"] - start == 2
    torch._dynamo.reset()
