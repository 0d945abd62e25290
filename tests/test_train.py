import dataclasses
import json

import pytest
import torch

from ddpm import get_preset, train
from ddpm.checkpoint import (
    CheckpointError,
    atomic_save,
    list_checkpoints,
    load_checkpoint,
    load_run_or_file,
    save_checkpoint,
)
from ddpm.config import resolve
from ddpm.data import load_dataset
from ddpm.diffusion import q_sample
from ddpm.models import UNet, UNetConfig
from ddpm.schedules import make_schedule
from ddpm.step import EMA
from ddpm.train import resume_config


def tiny_config(data_dir, **train_overrides):
    c = get_preset("tiny")
    return dataclasses.replace(
        c,
        model=dataclasses.replace(c.model, dropout=0.1),  # exercise the global RNG on resume
        data=dataclasses.replace(c.data, data_dir=str(data_dir), hflip=True),
        train=dataclasses.replace(c.train, **{"sample_every": 0, **train_overrides}),
    )


def test_tiny_model_overfits_one_batch():
    """Same x0, t and noise every step: a working model + optimiser drives the loss far down."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                            attention_resolutions=(8,), dropout=0.0, norm_groups=4))
    schedule = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 16, 16, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (8,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = q_sample(schedule, x0, t, eps)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = ((model(x_t, t) - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.9  # the zero-initialised output predicts 0: loss = E[eps^2] ~ 1
    assert losses[-1] < losses[0] / 20


def test_ema_follows_the_closed_form():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(5):
        ema.update(model)
    # after n updates towards a constant 1 from 0: 1 - decay^n
    assert ema.model.weight.item() == pytest.approx(1 - 0.9**5)


def _weights(run_dir):
    _, state = load_run_or_file(run_dir)
    return state


def test_resume_is_bit_identical(tmp_path, fake_fashion):
    n = 8
    full = train(tiny_config(fake_fashion, steps=n, checkpoint_every=0), tmp_path / "full",
                 progress=False, final_grid=False)
    train(tiny_config(fake_fashion, steps=n // 2, checkpoint_every=0), tmp_path / "split",
          progress=False, final_grid=False)
    resumed = train(resume_config(tmp_path / "split", steps=n), tmp_path / "split", resume=True,
                    progress=False, final_grid=False)
    assert full.step == resumed.step == n
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "split")
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    # the metrics log holds each step once, even across the resume
    steps = [json.loads(s)["step"] for s in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == n


def test_checkpoint_holds_the_state_and_keeps_the_newest(tmp_path, fake_fashion):
    train(tiny_config(fake_fashion, steps=6, checkpoint_every=2, keep_checkpoints=2),
          tmp_path / "run", progress=False, final_grid=False)
    names = [p.name for p in list_checkpoints(tmp_path / "run")]
    assert names == ["ckpt-00000006.pt", "ckpt-00000004.pt"]
    state = load_checkpoint(tmp_path / "run/checkpoints/ckpt-00000006.pt")
    assert state["step"] == 6 and state["config"]["train"]["steps"] == 6
    assert state["ema_state"] == {"num_updates": 6} and state["data_stream"]["pos"] == 6 * 16 % 256
    assert state["scaler"] is None and state["elapsed_s"] > 0 and state["best_fid"] == float("inf")
    # the weights a checkpoint names are the ones that sample: its EMA copy differs from the model
    assert any(not torch.equal(state["model"][k], state["ema"][k]) for k in state["model"])


def test_train_state_round_trip(tmp_path, fake_fashion):
    """TrainState.load_state_dict puts a checkpoint back into fresh objects, whose state_dict is
    the checkpoint again: the layout is written in one place and read back whole."""
    from ddpm.runtime import make_accelerator
    from ddpm.train import build_training

    config = resolve(tiny_config(fake_fashion, steps=3))
    train(config, tmp_path / "run", progress=False, final_grid=False)
    path, saved = load_run_or_file(tmp_path / "run")
    cpu = torch.device("cpu")
    fresh = build_training(config, make_accelerator(cpu), cpu,
                           lambda: load_dataset("fashion-mnist", fake_fashion))
    state = fresh.state()
    state.load_state_dict(saved, path)
    again = state.state_dict()
    assert again.keys() == saved.keys() - {"format_version"}
    for key in ("model", "ema"):
        assert all(torch.equal(again[key][k], saved[key][k]) for k in saved[key])
    for key in ("step", "config", "ema_state", "classes", "skipped_steps", "best_fid", "num_params"):
        assert again[key] == saved[key], key
    assert torch.equal(again["data_stream"]["perm"], saved["data_stream"]["perm"])
    assert all(torch.equal(again["rng"][k], saved["rng"][k]) for k in saved["rng"])
    assert again["optimizer"]["state"][0]["step"] == saved["optimizer"]["state"][0]["step"] == 3
    assert again["elapsed_s"] >= saved["elapsed_s"]


def test_train_leaves_torch_global_state_as_it_found_it(tmp_path, fake_fashion):
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(tiny_config(fake_fashion, steps=2, threads=1), tmp_path / "run", progress=False,
          final_grid=False)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.rand(3), expected), "train() moved the global random state"


def test_train_fits_the_model_to_the_data_from_python(tmp_path, fake_fashion):
    """The Python API resolves the config as the command line does: the preset's 28 px U-Net
    (here with attention at its 7 px level) trains on 32 px images with its attention kept at
    the same level."""
    c = get_preset("fashion-cpu")
    config = dataclasses.replace(
        c, data=dataclasses.replace(c.data, data_dir=str(fake_fashion), image_size=32),
        model=dataclasses.replace(c.model, attention_resolutions=(7,)),
        train=dataclasses.replace(c.train, steps=1, batch_size=8, sample_every=0, fid_every=0))
    train(config, tmp_path / "run", progress=False, final_grid=False)
    saved = json.loads((tmp_path / "run/config.json").read_text())
    assert saved["model"]["image_size"] == 32 and saved["model"]["attention_resolutions"] == [8]


def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"format_version": 1, "config": {}, "value": torch.arange(3)}, path)

    def torch_save_that_dies(obj, f):
        f.write(b"PK\x03\x04 half a zip file")  # some bytes reach the disk, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr("ddpm.checkpoint.torch.save", torch_save_that_dies)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"value": torch.arange(5)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["value"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"], "temporary file left behind"


def test_newest_unloadable_checkpoint_falls_back(tmp_path):
    save_checkpoint({"step": 1, "config": {}}, tmp_path)
    newest = save_checkpoint({"step": 2, "config": {}}, tmp_path)
    newest.write_bytes(newest.read_bytes()[:50])  # e.g. a disk that lost the file's tail
    with pytest.warns(UserWarning, match=r"ckpt-00000002\.pt does not load .* using the newest "
                                         r"checkpoint that does, .*ckpt-00000001\.pt"):
        path, state = load_run_or_file(tmp_path)
    assert state["step"] == 1 and path.name == "ckpt-00000001.pt"
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(newest)


def test_sampling_steps_beyond_T_are_refused_before_training(tmp_path, fake_fashion):
    config = tiny_config(fake_fashion, steps=2, sample_steps=500)  # tiny preset: T = 100
    with pytest.raises(ValueError, match="train.sample_steps is 500 but must be between 1 and T = 100"):
        train(config, tmp_path / "run", progress=False, final_grid=False)
    assert not (tmp_path / "run").exists(), "nothing may be written before the check"


def test_the_sync_free_step_equals_a_straightforward_one(fake_fashion):
    """train_step decides on the device (fused AdamW's found_inf, a masked EMA, on-device
    counters) what a plain loop decides on the host: with the same batches, noise and a NaN
    batch in the middle, the weights, the EMA and the optimiser's state come out equal."""
    import copy

    from ddpm.data import ImageData
    from ddpm.diffusion import draw_t_eps, training_loss
    from ddpm.runtime import make_accelerator
    from ddpm.train import build_training

    config = tiny_config(fake_fashion)  # dropout 0.1: the global RNG is reseeded for each
    # fp32, as the plain loop computes (auto would be bf16 autocast on a CPU with bf16 hardware)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, precision="fp32"))
    cpu = torch.device("cpu")
    data = ImageData(torch.zeros(32, 1, 28, 28, dtype=torch.uint8), torch.zeros(32, dtype=torch.long), "x")
    run = build_training(config, make_accelerator(cpu), cpu, lambda: data)
    net = copy.deepcopy(run.net)
    ema = copy.deepcopy(run.net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=config.train.lr, betas=config.train.adam_betas,
                            weight_decay=config.train.weight_decay, fused=True)
    noise = torch.Generator().manual_seed(7)
    run.noise_generator.manual_seed(7)
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(16, 1, 28, 28, generator=g) * 2 - 1 for _ in range(6)]
    batches[2][0, 0, 0, 0] = float("nan")  # step 3: a non-finite loss
    labels = torch.zeros(16, dtype=torch.long)
    updates = 0
    for i, x0 in enumerate(batches):
        torch.manual_seed(100 + i)
        stats = run.update([(x0, labels)], lr=1e-3)
        # the plain loop, on the host
        torch.manual_seed(100 + i)
        for group in opt.param_groups:
            group["lr"] = 1e-3
        opt.zero_grad(set_to_none=True)
        t, eps = draw_t_eps(run.schedule, x0.shape, noise)
        loss = training_loss(net, run.schedule, x0, t=t, eps=eps)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(net.parameters()), config.train.grad_clip)
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(norm))
        assert bool(stats.updated) == finite and bool(stats.faulty) == (not finite)
        if finite:
            opt.step()
            decay = min(config.train.ema_decay, (1 + updates) / (10 + updates))
            torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in net.parameters()],
                                 1.0 - decay)
            updates += 1
    assert updates == 5 and run.ema.num_updates == 5
    for mine, theirs in ((run.net, net), (run.ema.model, ema)):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    for a, b in zip(run.optimizer.state.values(), opt.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_a_compile_that_fails_falls_back_to_eager_with_one_warning(fake_fashion, monkeypatch):
    """--compile's first step compiles; if that fails (no C compiler, an unsupported op), the
    step runs uncompiled from the same random state: the weights equal an uncompiled run's."""
    from ddpm.data import ImageData
    from ddpm.runtime import make_accelerator
    from ddpm.train import build_training

    class FailsToCompile(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            raise RuntimeError("InductorError: no working C compiler found\nmore detail")

    cpu = torch.device("cpu")
    data = ImageData(torch.zeros(32, 1, 28, 28, dtype=torch.uint8), torch.zeros(32, dtype=torch.long), "x")
    runs = {}
    monkeypatch.setattr(torch, "compile", FailsToCompile)
    for compile_ in (True, False):
        config = tiny_config(fake_fashion, compile=compile_)
        runs[compile_] = build_training(config, make_accelerator(cpu), cpu, lambda: data)
        if compile_:
            with pytest.warns(UserWarning, match=r"torch.compile failed \(RuntimeError: "
                                                 r"InductorError: no working C compiler found\); "
                                                 r"training goes on without it"):
                runs[compile_].update(runs[compile_].next_batches(), 1e-3)
            assert runs[compile_].model is not None and runs[compile_].eager is None
            runs[compile_].update(runs[compile_].next_batches(), 1e-3)  # no second warning
        else:
            for _ in range(2):
                runs[compile_].update(runs[compile_].next_batches(), 1e-3)
    for a, b in zip(runs[True].net.parameters(), runs[False].net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_random_state_from_another_kind_of_device_gives_a_warning_not_a_crash(tmp_path,
                                                                                  fake_fashion):
    """--device may change on resume; a GPU's generator states do not fit a CPU's (here: a state
    of the wrong size stands for one), so the run goes on from new seeds and says so."""
    train(tiny_config(fake_fashion, steps=2), tmp_path / "run", progress=False, final_grid=False)
    path = list_checkpoints(tmp_path / "run")[0]
    state = load_checkpoint(path)
    state["rng"]["noise"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA Philox state's size
    torch.save(state, path)
    with pytest.warns(UserWarning, match="saved on another kind of device than cpu"):
        result = train(resume_config(tmp_path / "run", steps=3), tmp_path / "run", resume=True,
                       progress=False, final_grid=False)
    assert result.step == 3


def test_a_run_forecasts_its_length_after_its_first_steps(fake_fashion, tmp_path, monkeypatch):
    """After FORECAST_STEPS timed steps the run says how long it will take: the steps left at
    the rate measured, and the network evaluations its previews, FID and final grid will spend
    at the rate of one evaluation timed then (here fixed at 0.3 s, so the sampling part is exact)."""
    from ddpm.pipeline import Pipeline
    from ddpm.train import FORECAST_STEPS

    from conftest import ddpm_in_process

    monkeypatch.setattr(Pipeline, "seconds_per_evaluation", lambda self, **kw: 0.3)
    steps, every, n, sample_steps = FORECAST_STEPS + 11, 20, 4, 5
    r = ddpm_in_process("train", "--preset", "tiny", "--data-dir", fake_fashion, "--steps", steps,
                        "--sample-every", every, "--sample-n", n, "--sample-steps", sample_steps,
                        "--precision", "fp32", "--no-progress", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    (line,) = [x for x in r.stdout.splitlines() if x.startswith(f"{FORECAST_STEPS} steps at")]
    assert f"the run's {steps} steps should take about" in line and "in all on this machine" in line
    # due after step 51 of 61: the preview at step 60 (n images x 5 steps) and the final grid
    # (n images x the run's own sampling steps), at 0.3 s an evaluation
    tiny_sampling_steps = get_preset("tiny").sample.num_sample_steps
    expected = (n * sample_steps + n * tiny_sampling_steps) * 0.3
    assert f"{expected / 60:.1f} sampling preview grids, FID and the final grid" in line
    short = ddpm_in_process("train", "--preset", "tiny", "--data-dir", fake_fashion, "--steps",
                            FORECAST_STEPS, "--sample-every", 0, "--no-progress", "--out",
                            tmp_path / "short")
    assert short.returncode == 0 and "should take about" not in short.stdout, "nothing left to say"
