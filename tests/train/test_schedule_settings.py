"""Each schedule's settings accept their boundary values and refuse the values just beyond, naming the key."""

import pytest

from preflab.config import ConfigError, load_config
from preflab.train.apo import ApoSettings
from preflab.train.cofs import CofsSettings
from preflab.train.ofs import OfsSettings

ACCEPTED = [
    (ApoSettings, {"iterations": 1, "prompts_per_iteration": 1, "max_new_tokens": 1, "batch_prompts": 1, "k": 2}),
    (ApoSettings, {"alpha": 0.0}), (ApoSettings, {"alpha": 0.999}), (ApoSettings, {"temperature": 1e-3}),
    (ApoSettings, {"temperature": 1.5}), (ApoSettings, {"top_p": 1.0}), (ApoSettings, {"top_p": 1e-3}),
    (ApoSettings, {"epochs_per_iteration": 0.5}), (ApoSettings, {"beta": 0.5}), (ApoSettings, {"beta": None}),
    (ApoSettings, {"iterations": 3, "beta": (0.5, 0.2, 0.1)}), (ApoSettings, {"inner": "ofs"}),
    (OfsSettings, {"alpha": 0.0, "swap_interval": 1, "slow_lr_ratio": 0.5, "beta": 0.5, "gap_clamp": 0.5}),
    (OfsSettings, {"slow_lr_ratio": 2.0, "beta": 2.0, "gap_clamp": 2.0}),
    (CofsSettings, {"buffer_size": 1, "grid_max_domains": 1, "pgd_steps": 1, "pgd_lr": 1e-3}),
    (CofsSettings, {"grid_step": 1.0}), (CofsSettings, {"grid_step": 0.25}), (CofsSettings, {"pgd_lr": 2.0}),
]

REFUSED = [
    (ApoSettings, {"iterations": 0}, r"^iterations: must be >= 1, got 0$"),
    (ApoSettings, {"prompts_per_iteration": 0}, r"^prompts_per_iteration: must be >= 1, got 0$"),
    (ApoSettings, {"k": 0}, r"^k: must be >= 1, got 0$"),
    (ApoSettings, {"k": 1}, r"^k: must be >= 2 \(a pair needs two samples\), got 1$"),
    (ApoSettings, {"max_new_tokens": 0}, r"^max_new_tokens: must be >= 1, got 0$"),
    (ApoSettings, {"batch_prompts": 0}, r"^batch_prompts: must be >= 1, got 0$"),
    (ApoSettings, {"alpha": -0.1}, r"^alpha: must be in \[0, 1\), got -0.1$"),
    (ApoSettings, {"alpha": 1.0}, r"^alpha: must be in \[0, 1\), got 1.0$"),
    (ApoSettings, {"temperature": 0.0},
     r"^temperature/top_p: need temperature > 0 and top_p in \(0, 1\], got 0.0, 0.9$"),
    (ApoSettings, {"top_p": 0.0}, r"^temperature/top_p: .* got 0.7, 0.0$"),
    (ApoSettings, {"top_p": 1.5}, r"^temperature/top_p: .* got 0.7, 1.5$"),
    (ApoSettings, {"epochs_per_iteration": 0.0}, r"^epochs_per_iteration: must be > 0, got 0.0$"),
    (ApoSettings, {"iterations": 3, "beta": (0.1, 0.2)},
     r"^beta: expected one value or 3 \(one per iteration\), got 2$"),
    (ApoSettings, {"iterations": 2, "beta": (0.1, 0.0)}, r"^beta: must be > 0, got \(0.1, 0.0\)$"),
    (ApoSettings, {"beta": 0.0}, r"^beta: must be > 0, got 0.0$"),
    (ApoSettings, {"inner": "cofs"},
     r"^inner: expected an offline-like schedule, one of \['offline', 'ofs'\]; got 'cofs'$"),
    (ApoSettings, {"inner": "nope"},
     r"^inner: expected an offline-like schedule, one of \['offline', 'ofs'\]; got 'nope'$"),
    (ApoSettings, {"task": "nope"}, r"^task: unknown task 'nope'; expected one of \["),
    (OfsSettings, {"alpha": -0.1}, r"^alpha: must be >= 0, got -0.1$"),
    (OfsSettings, {"swap_interval": 0}, r"^swap_interval: must be >= 1, got 0$"),
    (OfsSettings, {"slow_lr_ratio": 0.0}, r"^slow_lr_ratio: must be > 0, got 0.0$"),
    (OfsSettings, {"beta": 0.0}, r"^beta: must be > 0 or null, got 0.0$"),
    (OfsSettings, {"gap_clamp": 0.0}, r"^gap_clamp: must be > 0 or null, got 0.0$"),
    (CofsSettings, {"buffer_size": 0}, r"^buffer_size: must be >= 1, got 0$"),
    (CofsSettings, {"grid_max_domains": 0}, r"^grid_max_domains: must be >= 1, got 0$"),
    (CofsSettings, {"pgd_steps": 0}, r"^pgd_steps: must be >= 1, got 0$"),
    (CofsSettings, {"pgd_lr": 0.0}, r"^pgd_lr: must be > 0, got 0.0$"),
    (CofsSettings, {"grid_step": 0.0}, r"^grid_step: must divide 1 \(0.1, 0.25, 0.5, ...\), got 0.0$"),
    (CofsSettings, {"grid_step": 0.3}, r"^grid_step: must divide 1 .* got 0.3$"),
    (CofsSettings, {"grid_step": 1.5}, r"^grid_step: must divide 1 .* got 1.5$"),
]


@pytest.mark.parametrize(("cls", "values"), ACCEPTED, ids=lambda v: getattr(v, "__name__", str(v)))
def test_boundary_values_are_accepted(cls, values):
    settings = cls(**values)
    assert all(getattr(settings, k) == v for k, v in values.items())


@pytest.mark.parametrize(("cls", "values", "message"), REFUSED, ids=lambda v: getattr(v, "__name__", str(v)))
def test_values_beyond_are_refused_naming_the_key(cls, values, message):
    with pytest.raises(ValueError, match=message):
        cls(**values)


def test_the_config_names_the_section_too():
    with pytest.raises(ConfigError, match=r"^apo.k: must be >= 2"):
        load_config(None, ["schedule=apo", "apo.k=1"])
    with pytest.raises(ConfigError, match=r"^ofs.beta: must be > 0 or null"):
        load_config(None, ["schedule=ofs", "ofs.beta=0"])
