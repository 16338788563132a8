"""On a CUDA GPU the model computes what it computes on the CPU (skipped where there is no GPU;
CI has none: these run on a lent GPU machine, see bench/README.md).

- training: loss and every parameter gradient of each decoder set-up on the GPU equal the CPU's
  (TF32 off, so that both are fp32 products: only summation order differs);
- bf16 training under CUDA autocast runs its matrix products in bf16, including the step loop's
  shared weights (cast once per batch, not per step), and its loss stays within 1 % of fp32;
- greedy and beam search on the GPU give the CPU's tokens, fp32 and bf16 (the same tolerance as
  bf16 on the CPU: >= 97 % of the sentences);
- a run of ``train`` on the GPU saves a checkpoint that the CPU loads and translates.

The rest of the suite also trains on the GPU where there is one (``train`` picks it).
"""

from __future__ import annotations

import pytest
import torch

from conftest import small_config
from nmtkit.checkpoint import LoadedModel
from nmtkit.config import ModelConfig
from nmtkit.data import DataDir
from nmtkit.model import build_model
from nmtkit.train import train
from nmtkit.translate import DecodeOptions, autocast, prepare_for_inference, translate_ids
from test_speed_paths import DECODER_SETUPS, MatmulDtypes, toy_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
GPU = torch.device("cuda")


@pytest.fixture
def no_tf32():
    """fp32 products in fp32 on the GPU (cuBLAS and cuDNN may otherwise round inputs to TF32)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _model(decoder="luong", attention="luong-general", window="global", rnn="lstm", input_feed=True):
    cfg = ModelConfig(decoder=decoder, attention=attention, window=window, rnn=rnn, input_feed=input_feed,
                      layers=2, hidden_size=12, embed_size=8, dropout=0.0, src_vocab_size=20, tgt_vocab_size=22)
    torch.manual_seed(0)
    return build_model(cfg)


def _loss_and_grads(model, device, precision="fp32"):
    src, lengths, tgt = (t.to(device) for t in toy_batch())
    model.zero_grad()
    with autocast(precision, device):
        loss, _ = model(src, lengths, tgt, tgt, 0.1)
    loss.backward()
    return loss.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("decoder,attention,window,rnn,input_feed", DECODER_SETUPS)
def test_gpu_loss_and_gradients_equal_cpu(no_tf32, decoder, attention, window, rnn, input_feed):
    cpu = _model(decoder, attention, window, rnn, input_feed)
    gpu = _model(decoder, attention, window, rnn, input_feed).to(GPU)
    cpu_loss, cpu_grads = _loss_and_grads(cpu, "cpu")
    gpu_loss, gpu_grads = _loss_and_grads(gpu, GPU)
    torch.testing.assert_close(gpu_loss, cpu_loss)
    assert gpu_grads.keys() == cpu_grads.keys()
    for name in cpu_grads:
        torch.testing.assert_close(gpu_grads[name], cpu_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_gpu_bf16_training_runs_bf16_products_close_to_fp32():
    model = _model().to(GPU)
    fp32_loss, _ = _loss_and_grads(model, GPU)
    with MatmulDtypes() as record:
        bf16_loss, grads = _loss_and_grads(model, GPU, "bf16")
    total = sum(record.flops.values())
    assert record.flops.get(torch.bfloat16, 0) / total > 0.95, record.flops
    torch.testing.assert_close(bf16_loss, fp32_loss, rtol=1e-2, atol=0)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())


def test_gpu_step_loop_weights_are_cast_once_per_batch():
    """Under CUDA autocast the decoder's per-batch plan holds bf16 weights (a per-step cast of
    every recurrent weight would be the slow path that CPU-only autocast checks used to take)."""
    model = _model().to(GPU)
    with autocast("bf16", GPU):
        plan = model.decoder.plan()
    assert plan["rnn"][0].w.dtype == torch.bfloat16 and plan["W_c"].w.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def gpu_trained(reverse_data, tmp_path_factory):
    """A small 2-layer luong model trained on the GPU (``train`` picks it) and the test sources."""
    save = tmp_path_factory.mktemp("gpu-model")
    config = small_config(layers=2)  # learns the task (tests/test_learning.py)
    train(reverse_data, save, config, log=lambda m: None)
    data = DataDir(reverse_data).split("test")
    return save / "best.pt", [data.source(i).tolist() for i in range(len(data))]


def test_gpu_checkpoint_loads_and_translates_on_the_cpu(gpu_trained, reverse_data):
    path, sources = gpu_trained
    for name in ("best.pt", "last.pt"):  # CPU tensors only: plain torch.load works without a GPU
        raw = torch.load(path.parent / name, weights_only=True)
        tensors = [*raw["model"].values(), *(t for state in raw.get("optimizer", {}).get("state", {}).values()
                                            for t in state.values())]
        assert tensors and all(t.device.type == "cpu" for t in tensors), name
    loaded = LoadedModel(path)
    assert next(loaded.model.parameters()).device.type == "cpu"
    data = DataDir(reverse_data).split("test")
    outs = translate_ids(prepare_for_inference(loaded.model), sources, DecodeOptions(beam=4, batch_size=32))
    exact = sum(o == data.target(i).tolist() for i, o in enumerate(outs)) / len(outs)
    assert exact >= 0.9, f"only {exact:.1%} of the test sentences exact after GPU training"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("beam", [1, 4])
def test_gpu_search_gives_cpu_tokens(gpu_trained, precision, beam):
    path, sources = gpu_trained
    opts = DecodeOptions(beam=beam, batch_size=32, precision=precision)
    want = translate_ids(prepare_for_inference(LoadedModel(path).model, precision), sources, opts)
    gpu_model = LoadedModel(path).model.to(GPU)
    got = translate_ids(prepare_for_inference(gpu_model, precision), sources, opts)
    same = sum(a == b for a, b in zip(got, want)) / len(sources)
    assert same >= (1.0 if precision == "fp32" else 0.97), f"{precision} beam {beam}: {same:.1%} equal the CPU's"
