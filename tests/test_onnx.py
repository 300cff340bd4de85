"""ONNX export of KAT: both of torch's exporters, fused and plain models, dynamic batch size. The GR-KAN ops
export as their reference composition in standard operators (docs/MODELS.md, GR-KAN function), so
onnxruntime runs the model without our kernels."""

import pytest
import timm
import torch

import kat  # noqa: F401  (registers the models)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_tiny_kat_exports_and_onnxruntime_matches(tmp_path, monkeypatch, dynamo, fused):
    """Exported at batch 2, run at batch 3: outputs within 1e-4 of PyTorch's (fp32), standard operators only."""
    if dynamo:
        pytest.importorskip("onnxscript")
    monkeypatch.setenv("KAT_RATIONAL_BACKEND", "triton")  # what a CUDA-built model runs; exports the same
    torch.manual_seed(0)
    model = timm.create_model("kat_tiny", img_size=32, patch_size=8, depth=1, num_classes=10, fused=fused).eval()
    with torch.no_grad():  # nonzero fc1 biases: the fused mixer adds them inside act2
        for block in model.blocks:
            block.mlp.fc1.bias.normal_(generator=torch.Generator().manual_seed(2))
    path = tmp_path / "kat.onnx"
    torch.onnx.export(
        model, (torch.randn(2, 3, 32, 32),), str(path), dynamo=dynamo, input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
    )  # fmt: skip
    graph = onnx.load(str(path)).graph
    assert all(node.domain in ("", "ai.onnx") for node in graph.node)  # no custom (kat) operators
    assert {"Abs", "Div"} <= {node.op_type for node in graph.node}  # |x|, |b| and P/Q
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(y), expected, rtol=1e-4, atol=1e-4)
