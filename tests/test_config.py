"""config.py, configfile.py, presets.py and settings.py: one declaration per setting, from which
the options, the overrides, the resume check and the help are made; config files (odd ones, and a
partial one on --resume), --dry-run, the checks each section runs, and the EDM formulation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ddpm.autoencoder import AutoencoderRunConfig
from ddpm.checkpoint import load_checkpoint
from ddpm.cli import build_parser
from ddpm.cli.options import given_settings
from ddpm.config import (
    SECTIONS,
    DataConfig,
    RunConfig,
    TrainConfig,
    fit_model,
    resume_changes,
    with_overrides,
)
from ddpm.configfile import load_config_file
from ddpm.models import UNet, UNetConfig, count_parameters
from ddpm.presets import AUTOENCODER_PRESETS, LATENT_PRESETS, PRESETS, get_autoencoder_preset, get_preset
from ddpm.settings import SettingError, field_types, item_type, settings_of, unwrap_optional

from conftest import assert_refused, ddpm_in_process, snapshot

# The settings that follow from others when the command line builds a run (config.with_overrides):
# a new dataset takes its own folder; the U-Net takes the data's size and channels (attention at
# the same level); a time budget replaces the preset's step count.
DERIVED = {
    "data.dataset": {"data.data_dir"},
    "data.image_size": {"model.image_size", "model.attention_resolutions"},
    "data.channels": {"model.in_channels"},
    "train.minutes": {"train.steps"},
    "model.learn_variance": {"sample.variance"},  # a learned variance samples with it
    "diffusion.sde": {"sample.sde"},  # a VE run is read through the VE SDE
}
TRAIN_SECTIONS = ("model", "diffusion", "data", "train")


def flat(config: RunConfig) -> dict[str, object]:
    return {f"{s}.{k}": v for s, values in config.to_dict().items() for k, v in values.items()}


def other_value(section: str, name: str, current) -> list[str]:
    """Command-line words that set ``section.name`` to a valid value other than ``current``."""
    cls = SECTIONS[section]
    decl = dict((f.name, d) for f, d in settings_of(cls))[name]
    kind, _ = unwrap_optional(field_types(cls)[name])
    flag = decl.flag
    if kind is bool:
        return [f"--no-{flag[2:]}" if current else flag]
    if decl.choices is not None:
        return [flag, str(next(c for c in decl.choices if c != current))]
    special = {"channel_mults": "1,2", "attention_resolutions": "14", "adam_betas": "0.8,0.99",
               "data_dir": "/somewhere/else", "cache_dir": "/a/cache", "device": "cpu",
               "wandb_project": "elsewhere", "image_size": "32", "posthoc_ema": "0.05,0.1"}
    if name in special:
        return [flag, special[name]]
    if item_type(kind) is None and kind is float:
        low = decl.at_least if decl.at_least is not None else (decl.above or 0.0)
        high = decl.below if decl.below is not None else decl.at_most
        value = (low + high) / 3 if high is not None else (current or 1.0) * 2 + 1
        return [flag, repr(value)]
    return [flag, str((current or 1) + 1)]


def train_settings():
    return [(s, f.name) for s in TRAIN_SECTIONS for f, d in settings_of(SECTIONS[s]) if d.flag]


@pytest.mark.parametrize("section, name", train_settings() + [("sample", "guidance")])
def test_every_train_option_changes_exactly_the_setting_it_names(section, name):
    base = with_overrides(get_preset("fashion-cpu"), {})
    key = f"{section}.{name}"
    words = other_value(section, name, flat(base)[key])
    args = build_parser().parse_args(["train", *words])
    changed = {k for k, v in flat(with_overrides(get_preset("fashion-cpu"), given_settings(args))).items()
               if v != flat(base)[k]}
    assert key in changed, f"{' '.join(words)} did not change {key}"
    assert changed - {key} <= DERIVED.get(key, set()), f"{' '.join(words)} also changed {changed}"


def test_every_setting_with_a_flag_is_an_option_of_its_commands():
    parser = build_parser()
    commands = {name: p for a in parser._subparsers._group_actions for name, p in a.choices.items()}
    viz = {name: p for a in commands["viz"]._subparsers._group_actions for name, p in a.choices.items()}

    def options(p):
        return {s: a.dest for a in p._actions for s in a.option_strings}

    for section, cls in SECTIONS.items():
        for f, decl in settings_of(cls):
            if decl.flag is None:
                continue
            key = f"{section}.{f.name}"
            takers = [commands["sample"], commands["eval"], viz["reverse"]] if section == "sample" \
                else [commands["train"]]
            for p in takers:
                assert options(p).get(decl.flag) == key, f"{p.prog} lacks {decl.flag} for {key}"
    derived = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f, d in settings_of(cls) if not d.flag]
    # the data's shape and classes; time_silu, which only old checkpoints set (to False); a
    # super-resolution model's conditioning, which follows --super-res; and what a latent run
    # reads from its autoencoder
    assert derived == ["model.in_channels", "model.image_size", "model.num_classes",
                       "model.time_silu", "model.cond_channels", "model.level_embedding",
                       "latent.sha256", "latent.channels", "latent.downsample"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name):
    config = get_preset(name)
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    resolved = with_overrides(config, {})
    assert RunConfig.from_dict(json.loads(json.dumps(resolved.to_dict()))) == resolved
    resolved.validate()


@pytest.mark.parametrize("name", sorted(AUTOENCODER_PRESETS))
def test_every_autoencoder_preset_round_trips_and_is_listed(name):
    config = get_autoencoder_preset(name)
    as_json = json.loads(json.dumps(config.to_dict()))
    assert AutoencoderRunConfig.from_dict(as_json) == config
    config.resolved().validate()
    r = ddpm_in_process("presets", name)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {name: as_json}


@pytest.mark.parametrize("name", sorted(LATENT_PRESETS))
def test_a_latent_preset_models_the_latents_of_its_autoencoder_preset(name):
    ae = get_autoencoder_preset(LATENT_PRESETS[name])
    diffusion = get_preset(name)
    assert ae.data == diffusion.data  # the images both are trained on
    model = diffusion.model
    assert ae.model.latent_shape == (model.in_channels, model.image_size, model.image_size)
    assert ae.model.image_size == diffusion.data.image_size


@pytest.mark.parametrize("values, message", [
    ({"train": {"lr": "fast"}}, "train.lr must be a number, got 'fast'"),
    ({"train": {"batch_size": 1.5}}, "train.batch_size must be a whole number, got 1.5"),
    ({"train": {"batch_size": True}}, "train.batch_size must be a whole number, got True"),
    ({"train": {"learning_rate": 1}}, "unknown setting train.learning_rate; the train settings "
                                      "are batch_size, lr,"),
    ({"model": {"channel_mults": 2}}, "model.channel_mults must be a list of whole numbers"),
    ({"optimiser": {}}, "unknown config section(s) 'optimiser'; the sections are model, diffusion"),
    ({"data": {"dataset": None}}, "data.dataset cannot be null"),
    (["model"], "a config is an object of sections (model, diffusion, data, train, sample, latent, "
                "superres)"),
])
def test_wrong_names_and_types_are_named(values, message):
    with pytest.raises(ValueError) as info:
        RunConfig.from_dict(values)
    assert message in str(info.value)


def test_json_numbers_become_the_declared_types():
    config = RunConfig.from_dict({"train": {"lr": 1, "adam_betas": [0.9, 1]},
                                  "model": {"channel_mults": [1, 2]}})
    assert isinstance(config.train.lr, float) and config.train.adam_betas == (0.9, 1.0)
    assert config.model.channel_mults == (1, 2)


@pytest.mark.parametrize("make, message", [
    (lambda: UNetConfig(dropout=1.0), "dropout must be in [0, 1), got 1.0"),
    (lambda: TrainConfig(lr=0.0), "lr must be positive, got 0.0"),
    (lambda: TrainConfig(ema_decay=1.0), "ema_decay must be in (0, 1), got 1.0"),
    (lambda: TrainConfig(steps=None, minutes=None), "would never stop"),
    (lambda: TrainConfig(minutes=float("inf")), "minutes must be finite and positive, got inf"),
    (lambda: TrainConfig(lr=float("nan")), "lr must be finite and positive, got nan"),
    (lambda: TrainConfig(on_nan="ignore"), "unknown on_nan 'ignore'; choose one of stop, skip"),
    (lambda: DataConfig(workers=-1), "workers must be at least 0, got -1"),
    (lambda: DataConfig(split="val"), "unknown split 'val'"),
])
def test_each_section_checks_its_declared_ranges(make, message):
    with pytest.raises(ValueError) as info:
        make().validate()
    assert message in str(info.value)


def test_rules_between_sections_name_the_setting_as_the_user_gave_it(fake_fashion, tmp_path):
    config = with_overrides(get_preset("tiny"), {"train": {"fid_steps": 500}})
    with pytest.raises(SettingError) as info:
        config.validate()
    assert str(info.value) == "train.fid_steps is 500 but must be between 1 and T = 100"
    r = ddpm_in_process("train", "--preset", "tiny", "--fid-steps", 500, "--data-dir", fake_fashion,
                        "--out", tmp_path / "run")
    assert r.returncode == 2 and "error: --fid-steps is 500 but must be between 1 and T = 100" in r.stderr
    assert not (tmp_path / "run").exists()


def test_the_preset_steps_shrink_with_T_but_given_ones_do_not():
    small = with_overrides(get_preset("fashion-cpu"), {"diffusion": {"num_train_timesteps": 30}})
    assert (small.sample.num_sample_steps, small.train.sample_steps, small.train.fid_steps) == (30, 30, 20)
    given = with_overrides(get_preset("fashion-cpu"), {"diffusion": {"num_train_timesteps": 30},
                                                       "train": {"sample_steps": 40}})
    assert given.train.sample_steps == 40  # and validate() says it is more than T


def test_the_model_follows_the_data_with_patches():
    model = UNetConfig(image_size=28, channel_mults=(1, 2, 2), attention_resolutions=(7,), patch_size=2)
    fitted = fit_model(model, 3, 64)  # levels 14, 7, 3 at 28 px become 32, 16, 8 at 64 px
    assert (fitted.in_channels, fitted.image_size, fitted.attention_resolutions) == (3, 64, (16,))


def test_resume_may_change_only_what_its_declaration_allows():
    saved = with_overrides(get_preset("tiny"), {})
    allowed = {"train": {"steps": 99, "minutes": 3.0, "device": "cpu", "threads": 1}}
    assert resume_changes(saved, allowed) == []
    assert resume_changes(saved, {"train": {"lr": 0.5}}) == [("train.lr", 0.001, 0.5)]
    assert resume_changes(saved, {"train": {"lr": 0.001}}) == [], "repeating a setting is fine"


# --- --config and --dry-run ---------------------------------------------------------------------


def dry_run(*args):
    r = ddpm_in_process("train", "--dry-run", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_dry_run_prints_the_config_and_parameters_and_writes_nothing(tmp_path, fake_fashion):
    out = dry_run("--preset", "tiny", "--data-dir", fake_fashion, "--out", tmp_path / "run",
                  "--lr", "0.01", "--image-size", "32")
    config = RunConfig.from_dict(out["config"])
    assert config.train.lr == 0.01 and config.model.image_size == 32
    assert out["parameters"] == count_parameters(UNet(config.model))
    assert list(tmp_path.iterdir()) == []


def test_config_file_partial_full_and_dry_run_output_with_flags_over_it(tmp_path, fake_fashion):
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"train": {"lr": 0.005, "batch_size": 8},
                                   "model": {"base_channels": 16}}))
    out = dry_run("--preset", "tiny", "--config", partial, "--batch-size", "4",
                  "--data-dir", fake_fashion)["config"]
    assert (out["train"]["lr"], out["train"]["batch_size"], out["model"]["base_channels"]) == (0.005, 4, 16)
    assert out["model"]["norm_groups"] == 4, "the rest is the preset's"
    printed = tmp_path / "printed.json"  # --dry-run's own output is a config file too
    printed.write_text(json.dumps(dry_run("--preset", "tiny", "--config", partial,
                                          "--data-dir", fake_fashion)))
    again = dry_run("--config", printed)["config"]  # over the default preset: every setting given
    assert again == dry_run("--preset", "tiny", "--config", partial, "--data-dir", fake_fashion)["config"]
    r = ddpm_in_process("train", "--config", printed, "--steps", 2, "--out", tmp_path / "run",
                        "--no-progress")
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "run/config.json").read_text())
    assert saved["train"]["steps"] == 2 and saved["model"] == again["model"]


@pytest.mark.parametrize("content, message", [
    ('{"train": {"lr": "fast"}}', "train.lr must be a number, got 'fast'"),
    ('{"train": {"learning_rate": 0.1}}', "unknown setting train.learning_rate; the train settings are"),
    ('{"train": ', "is not JSON"),
    ('[1, 2]', "must hold an object of sections"),
    ('{"sample": {"guidance": Infinity}}', "sample.guidance must be finite and in [0, 100], got inf"),
    ('{"train": {"lr_schedule": "step"}}', "unknown train.lr_schedule 'step'; choose one of"),
])
def test_a_bad_config_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "c.json"
    path.write_text(content)
    r = ddpm_in_process("train", "--config", path, "--out", tmp_path / "run")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert f"--config {path}" in lines[0] and not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="--config"):
        load_config_file(path)


def test_resume_with_the_same_options_and_a_different_one(tmp_path, fake_fashion):
    run = tmp_path / "run"
    first = ["--preset", "tiny", "--data-dir", fake_fashion, "--sample-every", 0, "--no-progress"]
    assert ddpm_in_process("train", *first, "--steps", 2, "--out", run).returncode == 0
    r = ddpm_in_process("train", *first, "--steps", 3, "--resume", run)  # a job script, re-run
    assert r.returncode == 0, r.stderr
    r = ddpm_in_process("train", *first, "--steps", 4, "--resume", run, "--lr", 0.5)
    assert r.returncode == 2 and "changes train.lr from 0.001 to 0.5" in r.stderr
    r = ddpm_in_process("train", "--preset", "fashion-cpu", "--resume", run, "--steps", 4)
    width = get_preset("fashion-cpu").model.base_channels
    assert r.returncode == 2 and f"changes model.base_channels from 8 to {width}" in r.stderr
    r = ddpm_in_process("train", "--resume", run, "--steps", 4, "--dry-run")
    assert r.returncode == 0 and json.loads(r.stdout)["config"]["train"]["steps"] == 4


def test_help_shows_the_preset_default_of_every_setting():
    r = ddpm_in_process("train", "--help")
    text = " ".join(r.stdout.split())
    assert "--lr X AdamW peak learning rate (fashion-cpu: 0.002)" in text
    assert "--channel-mults M1,M2,..." in text and "(fashion-cpu: 1,2,3)" in text
    assert "--hflip, --no-hflip" in text


def test_both_sides_of_a_switch_is_an_error():
    r = ddpm_in_process("train", "--hflip", "--no-hflip")
    assert r.returncode == 2 and "give --hflip or --no-hflip, not both" in r.stderr


def test_a_config_class_is_frozen_and_keyword_only():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_preset("tiny").train.lr = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        TrainConfig(64)  # type: ignore[misc]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_builds(name):
    config = with_overrides(get_preset(name), {})
    config.validate()
    params = count_parameters(UNet(config.model))
    if name == "cifar10-ddpm":  # Ho et al. 2020 report 35.7M parameters for their CIFAR-10 model
        assert abs(params - 35.7e6) < 0.1e6, params
        assert (config.train.batch_size, config.train.lr, config.train.warmup_steps,
                config.train.ema_decay, config.train.steps) == (128, 2e-4, 5000, 0.9999, 800_000)
        assert (config.data.dataset, config.data.hflip, config.diffusion.schedule) == \
            ("cifar10", True, "linear")


def test_the_default_preset_follows_the_device(monkeypatch):
    import torch

    from ddpm.cli import train as train_command

    def parsed(*words):
        return build_parser().parse_args(["train", *words])

    assert train_command._preset_name(parsed()) == "fashion-cpu"  # this machine: a CPU
    assert train_command._preset_name(parsed("--preset", "tiny")) == "tiny"
    monkeypatch.setattr(train_command, "resolve_device", lambda name: torch.device(
        "cpu" if name == "cpu" else "cuda"))
    assert train_command._preset_name(parsed()) == "fashion-gpu"
    assert train_command._preset_name(parsed("--device", "cpu")) == "fashion-cpu"


# --- config files that are right, and a partial one on --resume -----------------------------------


def test_a_config_file_with_a_byte_order_mark_is_read(world, tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"train": {"lr": 0.002}}')  # as some editors save it
    r = ddpm_in_process("train", "--preset", "tiny", "--config", path, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["train"]["lr"] == 0.002


def test_a_partial_config_on_resume_lies_over_the_runs_own_settings(world, tmp_path):
    """What the file leaves out is the run's, not the default preset's: a file that sets the
    stopping rule and the run's own lr resumes; one that changes lr is refused, naming lr."""
    path = tmp_path / "more.json"
    path.write_text('{"train": {"lr": 0.001, "steps": 3}}')
    before = snapshot(world)
    r = ddpm_in_process("train", "--resume", world / "run", "--config", path, "--dry-run")
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)["config"]
    saved = RunConfig.from_dict(load_checkpoint(world / "run/checkpoints/ckpt-00000002.pt")["config"])
    assert config["train"]["steps"] == 3 and RunConfig.from_dict(config).model == saved.model
    path.write_text('{"train": {"lr": 0.002}}')
    r = ddpm_in_process("train", "--resume", world / "run", "--config", path, "--steps", 3)
    assert_refused(r, f"--config {path} changes train.lr from 0.001 to 0.002", ("base_channels",))
    assert snapshot(world) == before


# --- the EDM formulation as one option ------------------------------------------------------------


def _dry_run(*options):
    import json

    from conftest import ddpm_in_process as cli

    r = cli("train", "--preset", "tiny", "--dry-run", *options)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["config"]


def test_formulation_edm_lays_its_settings_over_the_preset_and_the_options_win(tmp_path):
    from ddpm.presets import FORMULATIONS

    plain, edm = _dry_run(), _dry_run("--formulation", "edm")
    changed = {(s, k): v for s in edm for k, v in edm[s].items() if plain[s][k] != v}
    # exactly Karras et al.'s pieces, each its own setting, and nothing else of the preset
    assert changed == {("diffusion", "preconditioning"): "edm",
                       ("diffusion", "timestep_sampling"): "log-normal",
                       ("diffusion", "loss_weighting"): "edm",
                       ("sample", "sampler"): "heun", ("sample", "num_sample_steps"): 18,
                       ("sample", "spacing"): "karras"}
    assert changed == {(s, k): v for s, d in FORMULATIONS["edm"].items() for k, v in d.items()}
    # an option given, and a --config file, override the formulation's value; the rest stays
    given = _dry_run("--formulation", "edm", "--loss-weighting", "min-snr", "--sigma-data", "0.8")
    assert given["diffusion"]["loss_weighting"] == "min-snr"
    assert given["diffusion"]["preconditioning"] == "edm" and given["diffusion"]["sigma_data"] == 0.8
    file = tmp_path / "c.json"
    file.write_text('{"diffusion": {"timestep_sampling": "uniform"}}')
    from_file = _dry_run("--formulation", "edm", "--config", file)
    assert from_file["diffusion"]["timestep_sampling"] == "uniform"
    assert from_file["sample"]["sampler"] == "heun"


def test_an_autoencoder_config_names_its_own_sections():
    from ddpm.autoencoder import AutoencoderRunConfig

    with pytest.raises(ValueError, match=r"unknown config section\(s\) 'sample'; the sections of "
                                         r"an autoencoder run are model, loss, data, train"):
        AutoencoderRunConfig.from_dict({"sample": {}})
