"""Tests for align/config.py: YAML + key=value overrides -> validated nested dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import pytest

from align.config import (
    ConfigError,
    config_class_for,
    config_to_dict,
    describe_config,
    describe_effective_config,
    doc,
    load_any_config,
    load_config,
    register_config,
    save_config,
)


# Config classes live at module level so `from __future__ import annotations` strings resolve.
@dataclass
class SamplerCfg:
    num_steps: int = doc(10, "Denoising steps per rollout.")
    eta: float = doc(0.7, "SDE noise level.")
    kind: Literal["sde", "ode"] = doc("sde", "Step function.")

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")


@dataclass
class TrainCfg:
    lr: float = doc(3e-4, "AdamW learning rate.")
    batch_size: int = doc(8, "Prompts per step.")
    use_ema: bool = doc(False, "Keep an EMA copy of the weights.")
    betas: tuple[float, float] = doc((0.9, 0.999), "AdamW betas.")
    output_dir: Path = doc(Path("runs/default"), "Where checkpoints go.")
    max_grad_norm: Optional[float] = doc(None, "Gradient clipping; null disables.")


@dataclass
class RewardCfg:
    names: list[str] = doc(["shapes_strict"], "Reward functions by registered name.")
    weights: dict[str, float] = doc({}, "Per-reward weight; missing means 1.")


@dataclass
class ExperimentCfg:
    """A toy experiment config."""

    run_name: str = doc("toy", "Name of the run folder.")
    seed: int = doc(0, "Random seed.")
    # The outer default differs from SamplerCfg's own (num_steps=10): partial YAML keeps it.
    sampler: SamplerCfg = doc(SamplerCfg(num_steps=20), "How rollouts are generated.")
    train: TrainCfg = doc(TrainCfg(), "Optimiser settings.")
    reward: RewardCfg = doc(RewardCfg(), "Which rewards to optimise.")
    eval_sampler: Optional[SamplerCfg] = doc(None, "Sampler for evaluation; null = same.")

    def __post_init__(self):
        if self.train.use_ema and self.train.batch_size < 2:
            raise ValueError("use_ema needs batch_size >= 2")


@dataclass
class RequiredCfg:
    model_path: str = doc(help="Path to the base model.")
    steps: int = doc(1, "Steps.")


@register_config("toy_algo_a")
@dataclass
class AlgoACfg:
    alpha: float = doc(0.5, "Alpha.")
    sampler: SamplerCfg = doc(SamplerCfg(), "Sampler.")


@register_config("toy_algo_b")
@dataclass
class AlgoBCfg:
    beta: int = doc(3, "Beta.")


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_nested_build_and_defaults(tmp_path):
    path = write(
        tmp_path,
        "run_name: exp1\n"
        "sampler:\n  eta: 0.3\n"
        "train:\n  lr: 0.001\n  betas: [0.8, 0.9]\n  output_dir: /tmp/out\n"
        "reward:\n  names: [a, b]\n  weights: {a: 2}\n",
    )
    cfg = load_config(ExperimentCfg, path)
    assert isinstance(cfg.sampler, SamplerCfg) and isinstance(cfg.train, TrainCfg)
    assert cfg.run_name == "exp1"
    assert cfg.sampler.eta == 0.3
    assert cfg.sampler.num_steps == 20  # outer default instance kept, not SamplerCfg's 10
    assert cfg.train.lr == 0.001 and cfg.train.batch_size == 8
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.train.output_dir == Path("/tmp/out")
    assert cfg.reward.names == ["a", "b"]
    assert cfg.reward.weights == {"a": 2.0} and isinstance(cfg.reward.weights["a"], float)
    assert cfg.eval_sampler is None
    # Defaults are per instance (no shared mutable default).
    assert load_config(ExperimentCfg).reward.names is not load_config(ExperimentCfg).reward.names


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(ExperimentCfg, write(tmp_path, "# only a comment\n")) == ExperimentCfg()


def test_dotted_overrides(tmp_path):
    path = write(tmp_path, "sampler:\n  num_steps: 4\n")
    cfg = load_config(
        ExperimentCfg,
        path,
        [
            "sampler.num_steps=12",
            "train.lr=1e-5",
            "reward.names=[clip, pickscore]",
            "reward.weights.clip=0.5",
            "eval_sampler.kind=ode",  # Optional sub-config created from its class defaults
            "run_name=2024",  # a str field keeps the literal override text
            "train.max_grad_norm=1.0",
        ],
    )
    assert cfg.sampler.num_steps == 12
    assert cfg.train.lr == 1e-5
    assert cfg.reward.names == ["clip", "pickscore"]
    assert cfg.reward.weights == {"clip": 0.5}
    assert cfg.eval_sampler == SamplerCfg(kind="ode")
    assert cfg.run_name == "2024"
    assert cfg.train.max_grad_norm == 1.0
    # data= sits between the file and the overrides.
    cfg = load_config(ExperimentCfg, path, ["seed=3"], data={"seed": 1, "sampler": {"eta": 0}})
    assert (cfg.seed, cfg.sampler.num_steps, cfg.sampler.eta) == (3, 4, 0.0)


def test_float_from_yaml11_exponent_string(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-4` as the string "1e-4".
    cfg = load_config(ExperimentCfg, write(tmp_path, "train:\n  lr: 1e-4\n"))
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert load_config(ExperimentCfg, overrides=["train.max_grad_norm=5e0"]).train.max_grad_norm == 5.0


def test_int_accepted_for_float(tmp_path):
    cfg = load_config(ExperimentCfg, write(tmp_path, "train:\n  lr: 1\n"))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_bool_rejected_for_int_and_float(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected int, got bool True"):
        load_config(ExperimentCfg, write(tmp_path, "train:\n  batch_size: true\n"))
    with pytest.raises(ConfigError, match=r"train\.lr: expected float, got bool False"):
        load_config(ExperimentCfg, overrides=["train.lr=false"])


def test_unknown_key_with_suggestion(tmp_path):
    path = write(tmp_path, "seed: 1\ntrain:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(ExperimentCfg, path)
    message = str(info.value)
    assert str(path) in message
    assert "unknown key 'train.lrr'" in message
    assert "did you mean 'train.lr'?" in message
    assert f"{path}:3:" in message  # line of the offending key
    assert info.value.key == "train.lrr"
    assert "\n" not in message
    # Unknown key from an override names the override.
    with pytest.raises(ConfigError, match=r"unknown key 'sampler\.num_stepz'.*'sampler\.num_steps'.*override"):
        load_config(ExperimentCfg, overrides=["sampler.num_stepz=3"])
    # No close match: list the valid keys instead.
    with pytest.raises(ConfigError, match=r"unknown key 'zzz'; valid keys here: run_name, seed"):
        load_config(ExperimentCfg, data={"zzz": 1})


def test_wrong_type_message(tmp_path):
    path = write(tmp_path, "train:\n  lr: abc\n")
    with pytest.raises(ConfigError) as info:
        load_config(ExperimentCfg, path)
    assert str(info.value) == f"{path}:2: train.lr: expected float, got str 'abc'"
    with pytest.raises(ConfigError, match=r"reward\.names\[1\]: expected str, got int 3"):
        load_config(ExperimentCfg, data={"reward": {"names": ["a", 3]}})
    with pytest.raises(ConfigError, match=r"train\.betas: expected 2 items"):
        load_config(ExperimentCfg, overrides=["train.betas=[0.9]"])
    with pytest.raises(ConfigError, match=r"sampler: expected a mapping for SamplerCfg, got int 5"):
        load_config(ExperimentCfg, overrides=["sampler=5"])
    with pytest.raises(ConfigError, match=r"train\.max_grad_norm: expected float \| None, got str 'x'"):
        load_config(ExperimentCfg, overrides=["train.max_grad_norm=x"])


def test_literal_violation(tmp_path):
    path = write(tmp_path, "sampler:\n  kind: euler\n")
    with pytest.raises(ConfigError) as info:
        load_config(ExperimentCfg, path)
    assert "sampler.kind: expected one of 'sde', 'ode', got 'euler'" in str(info.value)
    assert str(path) in str(info.value)


def test_malformed_yaml_reports_file_and_line(tmp_path):
    path = write(tmp_path, "seed: 1\ntrain:\n  lr: [1, 2\n  batch_size: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(ExperimentCfg, path)
    message = str(info.value)
    assert message.startswith(f"{path}:")
    assert "malformed YAML" in message
    line = int(message[len(f"{path}:"):].split(":")[0])
    assert 3 <= line <= 5
    bad_indent = write(tmp_path, "seed: 1\n  train: 2\n", "indent.yaml")
    with pytest.raises(ConfigError, match=rf"{bad_indent}:2:\d+: malformed YAML"):
        load_config(ExperimentCfg, bad_indent)


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, "seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=rf"{path}:2: seed: duplicate key"):
        load_config(ExperimentCfg, path)


def test_non_mapping_top_level(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match=rf"{path}: top-level YAML must be a mapping.*got list"):
        load_config(ExperimentCfg, path)


def test_override_without_equals():
    with pytest.raises(ConfigError, match=r"override 'train\.lr': expected key=value"):
        load_config(ExperimentCfg, overrides=["train.lr"])
    with pytest.raises(ConfigError, match=r"empty key"):
        load_config(ExperimentCfg, overrides=["=3"])
    with pytest.raises(ConfigError, match=r"malformed YAML value"):
        load_config(ExperimentCfg, overrides=["reward.names=[a, b"])
    with pytest.raises(ConfigError, match=r"seed is int 0, not a mapping"):
        load_config(ExperimentCfg, data={"seed": 0}, overrides=["seed.x=1"])


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"missing required key\(s\): model_path"):
        load_config(RequiredCfg, data={"steps": 2})
    assert load_config(RequiredCfg, overrides=["model_path=/m"]).model_path == "/m"


def test_post_init_error_names_sub_config(tmp_path):
    path = write(tmp_path, "seed: 1\nsampler:\n  num_steps: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(ExperimentCfg, path)
    message = str(info.value)
    assert message.startswith(f"{path}:2: sampler: ")
    assert "num_steps must be >= 1, got 0" in message
    assert info.value.key == "sampler"
    # Top-level __post_init__ (a combination across sub-configs) names the class.
    with pytest.raises(ConfigError, match=r"invalid ExperimentCfg: use_ema needs batch_size >= 2"):
        load_config(ExperimentCfg, overrides=["train.use_ema=true", "train.batch_size=1"])


def test_algorithm_key_and_registry(tmp_path):
    path = write(tmp_path, "algorithm: toy_algo_a\nalpha: 1e-2\nsampler:\n  num_steps: 3\n")
    name, cfg = load_any_config(path, ["sampler.eta=0.1"])
    assert name == "toy_algo_a" and isinstance(cfg, AlgoACfg)
    assert cfg.alpha == 0.01 and cfg.sampler.num_steps == 3 and cfg.sampler.eta == 0.1
    assert config_class_for("toy_algo_b") is AlgoBCfg
    # load_config drops the algorithm key, but refuses a file for another algorithm.
    assert load_config(AlgoACfg, path).alpha == 0.01
    with pytest.raises(ConfigError, match=r"algorithm: file is for algorithm 'toy_algo_a'"):
        load_config(AlgoBCfg, path)
    # An algorithm=... override switches the class.
    name, cfg = load_any_config(write(tmp_path, "algorithm: toy_algo_a\n", "a.yaml"), ["algorithm=toy_algo_b"])
    assert name == "toy_algo_b" and cfg == AlgoBCfg()


def test_unknown_or_missing_algorithm_lists_registered(tmp_path):
    unknown = write(tmp_path, "algorithm: grpoo\n", "unknown.yaml")
    with pytest.raises(ConfigError) as info:
        load_any_config(unknown)
    assert str(unknown) in str(info.value) and "unknown algorithm 'grpoo'" in str(info.value)
    assert "toy_algo_a" in str(info.value) and "toy_algo_b" in str(info.value)
    missing = write(tmp_path, "alpha: 1\n", "missing.yaml")
    with pytest.raises(ConfigError, match=r"missing top-level 'algorithm' key; registered: .*toy_algo_a"):
        load_any_config(missing)
    with pytest.raises(ConfigError, match=r"unknown algorithm 'nope'; registered: .*toy_algo_b"):
        config_class_for("nope")


def test_register_rejects_name_clash():
    with pytest.raises(ValueError, match="already registered"):
        register_config("toy_algo_a")(AlgoBCfg)
    with pytest.raises(TypeError, match="expects a dataclass"):
        register_config("not_a_dataclass")(int)


def test_save_load_round_trip_is_atomic(tmp_path):
    cfg = load_config(
        ExperimentCfg,
        overrides=[
            "train.lr=1e-5", "train.betas=[0.5, 0.6]", "train.output_dir=/x/y", "sampler.kind=ode",
            "reward.weights={a: 1.5}", "eval_sampler.num_steps=2", "train.max_grad_norm=1",
        ],
    )
    out = save_config(cfg, tmp_path / "run" / "config.yaml", header="align train cfg.yaml")
    assert out.read_text().startswith("# align train cfg.yaml\n")
    assert load_config(ExperimentCfg, out) == cfg
    assert sorted(p.name for p in out.parent.iterdir()) == ["config.yaml"]  # no temp files left
    plain = config_to_dict(cfg)
    assert plain["train"]["output_dir"] == "/x/y" and plain["train"]["betas"] == [0.5, 0.6]
    # Registered configs record their algorithm so load_any_config reloads them.
    algo = load_config(AlgoACfg, overrides=["alpha=2"])
    path = save_config(algo, tmp_path / "algo.yaml")
    assert path.read_text().startswith("algorithm: toy_algo_a\n")
    assert load_any_config(path) == ("toy_algo_a", algo)
    # Overwriting replaces the file whole; a failed write leaves the old file and no temp.
    save_config(AlgoACfg(), path)
    bad = dataclasses.replace(algo, alpha=object())  # not YAML-serialisable
    with pytest.raises(Exception):
        save_config(bad, path)
    assert load_any_config(path) == ("toy_algo_a", AlgoACfg())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["algo.yaml", "run"]


def test_describe_config_lists_dotted_fields_with_help():
    text = describe_config(ExperimentCfg)
    assert "A toy experiment config." in text
    assert "  seed (int; default: 0)" in text
    assert "Random seed." in text
    assert "  sampler.num_steps (int; default: 20)" in text  # the outer default instance
    assert "Denoising steps per rollout." in text
    assert "  sampler.kind ('sde' | 'ode'; default: 'sde')" in text
    assert "  train.lr (float; default: 0.0003)" in text
    assert "  train.betas (tuple[float, float]; default: [0.9, 0.999])" in text
    assert "  train.max_grad_norm (float | None; default: null)" in text
    assert "  reward.names (list[str]; default: [shapes_strict])" in text
    assert "  eval_sampler (SamplerCfg | None; default: null)" in text
    assert "  model_path (str; required)" in describe_config(RequiredCfg)
    assert "(algorithm: toy_algo_a)" in describe_config(AlgoACfg)


def test_describe_effective_config_marks_file_override_and_default(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("seed: 3\nsampler:\n  eta: 0.5\ntrain:\n  lr: 1.0e-3\n")
    overrides = ["train.lr=0.01", "reward.names=[a,b]"]
    cfg = load_config(ExperimentCfg, path, overrides)
    rows = {line.split()[0]: line for line in describe_effective_config(cfg, path, overrides).splitlines()[1:]}
    assert rows["seed"].split()[1:] == ["3", f"[{path}:1]"]  # from the file, with its line
    assert rows["sampler.eta"].split()[1:] == ["0.5", f"[{path}:3]"]
    assert rows["train.lr"].split()[1:] == ["0.01", "[override]"]  # the override beats the file
    assert rows["reward.names"].endswith("[a, b]  [override]")
    assert rows["sampler.num_steps"].split()[1:] == ["20", "[default]"]  # the outer default instance
    assert rows["train.batch_size"].split()[1:] == ["8", "[default]"]
    assert rows["eval_sampler"].split()[1:] == ["null", "[default]"]
    # a null the trainer fills (e.g. a variant's paper default) shows the filled value
    resolved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_grad_norm=1.0))
    text = describe_effective_config(cfg, path, overrides, resolved)
    row = next(line for line in text.splitlines() if line.split()[0] == "train.max_grad_norm")
    assert row.split(None, 1)[1] == "1.0  [default, null -> resolved]"
    # without a file: every value is a default
    plain = describe_effective_config(ExperimentCfg())
    assert "from defaults" in plain.splitlines()[0]
    assert all(line.endswith("[default]") for line in plain.splitlines()[1:])


def test_doc_helper():
    f = {f.name: f for f in dataclasses.fields(RewardCfg)}["names"]
    assert f.metadata["help"].startswith("Reward functions")
    assert f.default is dataclasses.MISSING and f.default_factory() == ["shapes_strict"]
    with pytest.raises(TypeError):
        doc(1, "x", default_factory=list)
