"""runtime.py: the device, the precision and its autocast, the Accelerate handle, and torch's
process-wide state kept as a caller had it."""

import dataclasses
import functools

import pytest
import torch

from ddpm import get_preset, runtime
from ddpm.runtime import (
    autocast,
    cpu_bf16_flag,
    resolve_device,
    resolve_precision,
    torch_state_kept,
    training_precision,
)
from ddpm.train import train

from conftest import another_thread_count


def test_devices_and_their_mistakes():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'; use cpu, cuda, cuda:N or auto"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available; use cpu or auto"):
            resolve_device("cuda:1")


def test_autocast_follows_the_precision():
    cpu = torch.device("cpu")
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    assert resolve_precision("auto", cpu) == "fp32", "nothing measured: the exact precision"
    with autocast(cpu, "fp32"):
        assert layer(x).dtype == torch.float32
    with autocast(cpu, "bf16"):
        assert layer(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", cpu)


def test_torch_state_is_kept_even_when_the_work_fails():
    threads, other = torch.get_num_threads(), another_thread_count()
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    with pytest.raises(RuntimeError):
        with torch_state_kept():
            torch.set_num_threads(other)
            torch.manual_seed(99)
            torch.rand(10)
            raise RuntimeError("the work failed")
    assert torch.get_num_threads() == threads and torch.equal(torch.rand(2), expected)


def cpuinfo(tmp_path, flags: str) -> str:
    """A /proc/cpuinfo of two processors with the given flags (the real file's layout)."""
    block = ("processor\t: {n}\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n"
             f"flags\t\t: fpu vme sse sse2 avx avx2 {flags}\nbogomips\t: 4890.85\n\n")
    path = tmp_path / "cpuinfo"
    path.write_text(block.format(n=0) + block.format(n=1))
    return str(path)


def test_bf16_hardware_is_read_from_the_cpu_flags(tmp_path, monkeypatch):
    assert cpu_bf16_flag(cpuinfo(tmp_path, "avx512f avx512_bf16 avx512_vnni")) == "avx512_bf16"
    assert cpu_bf16_flag(cpuinfo(tmp_path, "avx512f amx_tile amx_bf16")) == "amx_bf16"
    # avx512f alone, or a flag that merely contains the name, is not bf16 hardware
    assert cpu_bf16_flag(cpuinfo(tmp_path, "avx512f avx512_bf16x")) is None
    assert cpu_bf16_flag(str(tmp_path / "no-such-file")) is None  # not Linux
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(runtime, "cpu_bf16_flag", lambda: "avx512_bf16")
    measured = lambda: ("bf16", "auto: bf16, bf16 measured 1.60x fp32 here")  # noqa: E731
    assert resolve_precision("auto", cpu, measured) == "bf16"
    assert training_precision("auto", cpu, measured) == measured()
    assert training_precision("fp32", cpu, measured) == ("fp32", "as asked")
    monkeypatch.setattr(runtime, "cpu_bf16_flag", lambda: None)
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("auto", cuda) == "bf16"
    assert training_precision("auto", cpu) == ("fp32", "auto: fp32, this CPU has no bf16 hardware")
    assert resolve_precision("bf16", cpu) == "bf16", "asked for, it is used even when emulated"


def test_precision_follows_the_environment_only_under_accelerate_launch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_bf16_flag", lambda: None)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # e.g. left over in a shell
    assert training_precision("auto", cpu) == ("fp32", "auto: fp32, this CPU has no bf16 hardware")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # what 'accelerate launch' sets too
    assert training_precision("auto", cpu) == ("bf16", "auto: accelerate launch --mixed_precision bf16")
    assert training_precision("fp32", cpu) == ("fp32", "as asked"), "an explicit choice wins"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        training_precision("fp16", cpu)


def test_processes_launched_without_a_precision_never_measure(monkeypatch):
    """One of several processes would time its share of the cores, and each could choose
    differently: without the launcher's --mixed_precision they take fp32 and measure nothing
    ('ddpm train --num-processes' measures once, before launching, and hands the choice on)."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_bf16_flag", lambda: "amx_bf16")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    monkeypatch.setenv("WORLD_SIZE", "2")

    def probe():
        raise AssertionError("a launched process measured")

    assert training_precision("auto", cpu, probe) == (
        "fp32", "auto: fp32, launched without --mixed_precision bf16")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert training_precision("auto", cpu, probe) == (
        "bf16", "auto: accelerate launch --mixed_precision bf16")


def test_runs_of_two_precisions_in_one_process(fake_fashion, tmp_path):
    """Accelerate's process-wide state takes one precision per process; ours is separate, so a
    notebook can train in bf16 and then in fp32 (no private reset of Accelerate's state). Each
    run's step computes in the precision it asked for: every convolution of the U-Net's forward
    pass puts out that dtype (recorded by a forward hook on all modules)."""
    c = get_preset("tiny")
    expected = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for precision in ("bf16", "fp32"):
        config = dataclasses.replace(c, data=dataclasses.replace(c.data, data_dir=str(fake_fashion)),
                                     train=dataclasses.replace(c.train, steps=1, precision=precision,
                                                               sample_every=0))
        result, dtypes = conv_output_dtypes(functools.partial(
            train, config, tmp_path / precision, progress=False, final_grid=False))
        assert result.step == 1
        assert dtypes and set(dtypes) == {expected[precision]}, (precision, set(dtypes))


def conv_output_dtypes(work):
    """``work()``'s result, and the dtype of every convolution's output computed meanwhile."""
    dtypes = []

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            dtypes.append(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        return work(), dtypes
    finally:
        hook.remove()


