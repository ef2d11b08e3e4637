"""Suite profiles and how command-line overrides are laid over them."""

from __future__ import annotations

import pytest

from continual_transformer.config import deep_merge
from continual_transformer.errors import ConfigError
from continual_transformer.tasks.bench import profiles


def test_profiles_and_overrides():
    quick = profiles.resolve_settings("clinc150-10", True, {"num_tasks": 2, "learner": {"pool_size": 3}})
    assert quick.num_tasks == 2 and quick.learner.pool_size == 3
    assert quick.learner.epochs == profiles.profile_settings("clinc150-10", quick=True).learner.epochs
    full = profiles.profile_settings("long15", quick=False)
    assert full.num_tasks is None and full.learner.max_text_tokens == 256
    assert (
        full.learner.router == "backbone"
        and profiles.profile_settings("banking77", quick=False).learner.router == "minilm"
    )
    with pytest.raises(ValueError, match="unknown suite"):
        profiles.profile_settings("nope", quick=True)


def test_command_line_changes_apply_in_order_and_reach_the_settings():
    changes = profiles.command_line_changes(
        order=1, num_tasks=4, overrides=["num_tasks=2", "learner.pool_size=5", "learner.epochs=1"], seed=7
    )
    assert changes == {"order": 1, "num_tasks": 2, "learner": {"pool_size": 5, "epochs": 1, "seed": 7}}
    settings = profiles.resolve_settings("clinc150-10", True, changes, data_dir="elsewhere")
    assert (settings.order, settings.num_tasks, settings.data_dir) == (1, 2, "elsewhere")
    assert (settings.learner.pool_size, settings.learner.epochs, settings.learner.seed) == (5, 1, 7)
    assert settings.learner.adapter_dim == 8  # the rest of the quick profile is kept
    assert profiles.command_line_changes(seed=0) == {}  # seed 0 keeps the profile's learner.seed
    with pytest.raises(ConfigError):
        profiles.resolve_settings("clinc150-10", True, {"learner": {"pool_size": 0}})


def test_profile_overrides_merge_nested_and_leave_their_arguments_alone():
    base = {"learner": {"a": 1, "b": 2}, "x": 1}
    merged = deep_merge(base, {"learner": {"b": 3}, "y": 2})
    assert merged == {"learner": {"a": 1, "b": 3}, "x": 1, "y": 2}
    assert base == {"learner": {"a": 1, "b": 2}, "x": 1}
