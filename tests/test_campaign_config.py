"""The campaign YAML: validated, unknown keys refused by path, files resolved and checked."""

from __future__ import annotations

import pytest

from bayesal.flows.campaign_config import load_campaign_config

GOOD = """
name: demo-1
data:
  pool_files: [pool.xyz]
  initial_random: 4
  test_files: [test.xyz]
members: 2
model: {channels: 8}
acquisition: {function: bald-ef, n_select: 3, selection: diverse}
labeler: {kind: replay, replay_files: [pool.xyz]}
stop: {max_rounds: 2, label_budget: 20}
"""


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "pool.xyz").write_text("1\n\nH 0 0 0\n")
    (tmp_path / "test.xyz").write_text("1\n\nH 0 0 0\n")
    return tmp_path


def test_a_good_config_loads_with_paths_resolved(folder, tmp_path, monkeypatch):
    (folder / "c.yaml").write_text(GOOD)
    monkeypatch.chdir(tmp_path.parent)  # relative to the YAML, not the working directory
    cfg = load_campaign_config(folder / "c.yaml")
    assert cfg.data.pool_files == [folder / "pool.xyz"]
    assert cfg.labeler.replay_files == [folder / "pool.xyz"]
    assert cfg.model.channels == 8 and cfg.members == 2
    assert cfg.acquisition.selection == "diverse" and cfg.stop.label_budget == 20
    assert cfg.runner.kind == "local" and cfg.explorer is None
    assert cfg.finetune is None  # rounds train from scratch unless asked


def test_finetune_overrides_only_what_it_names(folder):
    (folder / "c.yaml").write_text(GOOD + "train: {lr: 0.02, max_epochs: 50, batch_size: 4}\n"
                                   "finetune: {max_epochs: 10}\n")
    cfg = load_campaign_config(folder / "c.yaml")
    tuned = cfg.finetune.apply(cfg.train)
    assert (tuned.lr, tuned.max_epochs, tuned.warmup_epochs, tuned.batch_size) == (0.02, 10, 0, 4)
    assert cfg.train.max_epochs == 50  # the first round's settings are untouched


@pytest.mark.parametrize(("edit", "message"), [
    (("n_select: 3", "nselect: 3"), "acquisition.nselect: Extra inputs are not permitted"),
    (("[pool.xyz]\n  initial", "[missing.xyz]\n  initial"), "data.pool_files: file"),
    (("function: bald-ef", "function: bald"), "acquisition.function: Input should be"),
    (("kind: replay, replay_files: [pool.xyz]", "kind: replay"),
     "labeler: kind replay needs replay_files"),
    (("name: demo-1", "name: 'bad name!'"), "name: String should match pattern"),
    (("  initial_random: 4\n", ""), "data: give initial_files or initial_random"),
    (("channels: 8", "chanels: 8"), "model.chanels: Extra inputs are not permitted"),
    (("members: 2", "members: 2\nfinetune: {lr: -0.1}"),
     "finetune.lr: Input should be greater than 0"),
])
def test_bad_configs_name_the_field(folder, edit, message):
    text = GOOD.replace(*edit)
    assert text != GOOD
    (folder / "c.yaml").write_text(text)
    with pytest.raises(ValueError) as err:
        load_campaign_config(folder / "c.yaml")
    assert str(folder / "c.yaml") in str(err.value)
    assert message in str(err.value)


def test_not_a_mapping_and_missing_file(tmp_path):
    (tmp_path / "c.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_campaign_config(tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="file not found"):
        load_campaign_config(tmp_path / "nope.yaml")
