"""Import -> database -> export keeps every number; bad input writes nothing."""

from __future__ import annotations

import ase.io
import numpy as np
import pandas as pd
import pytest
from sqlalchemy import func, select

from bayesal.db import Campaign, Label, Structure, session_scope
from bayesal.db.engine import DatabaseError
from bayesal.db.export import export_campaign
from bayesal.db.importer import ReferenceLevel, import_files
from bayesal.db.readers import InputError

PBE = ReferenceLevel("PBE", "def2-SVP")


def counts(engine) -> dict[str, int]:
    with session_scope(engine) as s:
        return {m.__tablename__: s.scalar(select(func.count()).select_from(m))
                for m in (Campaign, Structure, Label)}


def test_round_trip_extxyz_is_exact(engine, db_url, shared_data, tmp_path):
    src = shared_data / "ethanol" / "train.xyz"
    report = import_files(engine, [src], "eth", labelled=True, level=PBE)
    assert (report.n_frames, report.n_structures_new, report.n_labels_new) == (1000, 1000, 1000)

    out = tmp_path / "out.xyz"
    exported = export_campaign(db_url, "eth", out)
    assert exported.n_structures == 1000
    ref = ase.io.read(src, ":")
    back = ase.io.read(out, ":")
    assert len(back) == len(ref)
    for a, b in zip(ref, back, strict=True):
        assert (a.numbers == b.numbers).all()
        assert np.abs(a.positions - b.positions).max() < 1e-9
        assert abs(a.get_potential_energy() - b.info["REF_energy"]) < 1e-9
        assert np.abs(a.get_forces() - b.arrays["REF_forces"]).max() < 1e-9
        assert b.info["config_type"] == a.info["config_type"]  # metadata kept
        np.testing.assert_allclose(a.cell.array, b.cell.array)
        assert (a.pbc == b.pbc).all()


def test_csv_and_parquet_carry_the_same_numbers(engine, db_url, shared_data, tmp_path):
    src = shared_data / "ethanol" / "test_MD.xyz"
    import_files(engine, [src], "eth", labelled=True, level=PBE, source="test")
    ref = ase.io.read(src, ":")
    export_campaign(db_url, "eth", tmp_path / "d.parquet", "parquet")
    export_campaign(db_url, "eth", tmp_path / "d.csv", "csv")
    pq = pd.read_parquet(tmp_path / "d.parquet")
    csv = pd.read_csv(tmp_path / "d.csv")
    assert len(pq) == len(csv) == len(ref)
    assert (pq["source"] == "test").all()
    i = 17
    np.testing.assert_array_equal(np.stack(pq["forces"][i]), ref[i].get_forces())
    assert pq["energy"][i] == ref[i].get_potential_energy()
    assert csv["energy"][i] == pytest.approx(ref[i].get_potential_energy(), abs=1e-9)
    assert pq["max_force"][i] == pytest.approx(np.linalg.norm(ref[i].get_forces(), axis=1).max())
    assert pq["energy_per_atom"][i] == pytest.approx(ref[i].get_potential_energy() / 9)


def test_importing_twice_changes_nothing(engine, shared_data):
    src = shared_data / "ethanol" / "train.xyz"
    import_files(engine, [src], "eth", labelled=True, level=PBE)
    before = counts(engine)
    again = import_files(engine, [src], "eth", labelled=True, level=PBE)
    assert counts(engine) == before == {"campaigns": 1, "structures": 1000, "labels": 1000}
    assert again.n_structures_duplicate == 1000 and again.n_structures_new == 0
    assert again.n_labels_existing == 1000 and again.n_labels_new == 0


def test_same_structures_at_another_level_get_a_second_label(engine, shared_data, db_url,
                                                             tmp_path):
    src = shared_data / "ethanol" / "isolated_atoms.xyz"
    import_files(engine, [src], "eth", labelled=True, level=PBE)
    import_files(engine, [src], "eth", labelled=True, level=ReferenceLevel("HF", "sto-3g"))
    assert counts(engine)["structures"] == 4 and counts(engine)["labels"] == 8
    with pytest.raises(DatabaseError, match="2 levels of theory"):
        export_campaign(db_url, "eth", tmp_path / "x.xyz")
    with session_scope(engine) as s:
        h = s.scalar(select(Label.settings_hash).where(Label.method == "hf").limit(1))
    assert export_campaign(db_url, "eth", tmp_path / "x.xyz",
                           settings_hash=h[:10]).settings_hash == h


GOOD = """2
Properties=species:S:1:pos:R:3:forces:R:3 energy=-1.0 pbc="F F F"
H 0 0 0 0 0 0.1
H 0 0 0.74 0 0 -0.1
2
Properties=species:S:1:pos:R:3:forces:R:3 energy=-1.1 pbc="F F F"
H 0 0 0 0 0 0.2
H 0 0 0.76 0 0 -0.2
"""

BAD = {
    "malformed": ("3\nProperties=species:S:1:pos:R:3 energy=-1\nH 0 0 0\nH 0 0 1\n", None),
    "nan_position": ('2\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.0 pbc="F F F"\n'
                     "H 0 0 nan 0 0 0\nH 0 0 0.7 0 0 0\n", "positions"),
    "unknown_element": ('2\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.0 pbc="F F F"\n'
                        "H 0 0 0 0 0 0\nXx 0 0 0.7 0 0 0\n", "species"),
    "no_energy": ('2\nProperties=species:S:1:pos:R:3:forces:R:3 pbc="F F F"\n'
                  "H 0 0 0 0 0 0\nH 0 0 0.7 0 0 0\n", "energy"),
    "no_forces": ('2\nProperties=species:S:1:pos:R:3 energy=-1.0 pbc="F F F"\n'
                  "H 0 0 0\nH 0 0 0.7\n", "forces"),
    "forces_shape": ('2\nProperties=species:S:1:pos:R:3:forces:R:2 energy=-1.0 pbc="F F F"\n'
                     "H 0 0 0 0 0\nH 0 0 0.7 0 0\n", "forces"),
    "too_close": ('2\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.0 pbc="F F F"\n'
                  "H 0 0 0 0 0 0\nH 0 0 0.05 0 0 0\n", "positions"),
    "empty_structure": ("0\nProperties=species:S:1:pos:R:3 energy=-1.0\n", None),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_file_frame_field_and_writes_nothing(engine, tmp_path, case):
    good = tmp_path / "good.xyz"
    good.write_text(GOOD)
    import_files(engine, [good], "existing", labelled=True)
    before = counts(engine)

    text, field = BAD[case]
    bad = tmp_path / f"{case}.xyz"
    bad.write_text(GOOD + text)  # two good frames, then the bad frame 2
    other = tmp_path / "other.xyz"
    other.write_text(GOOD.replace("0.74", "0.71").replace("0.76", "0.77"))
    with pytest.raises(InputError) as info:
        import_files(engine, [other, bad], "new", labelled=True)
    issue = info.value.issues[0]
    assert issue.file == str(bad)
    assert issue.frame == 2, str(info.value)
    if field is not None:
        assert issue.field == field, str(info.value)
    assert "nothing was written" in str(info.value)
    assert f"{bad}, frame 2" in str(info.value)
    assert counts(engine) == before  # not even the campaign or the good file's frames


def test_every_problem_is_listed_not_just_the_first(engine, tmp_path):
    bad = tmp_path / "bad.xyz"
    bad.write_text(BAD["no_energy"][0] + BAD["too_close"][0] + BAD["nan_position"][0])
    with pytest.raises(InputError) as info:
        import_files(engine, [bad], "c", labelled=True)
    assert [(i.frame, i.field) for i in info.value.issues] == [
        (0, "energy"), (1, "positions"), (2, "positions")]


def test_missing_file_is_reported(engine, tmp_path):
    with pytest.raises(InputError, match="file not found"):
        import_files(engine, [tmp_path / "nope.xyz"], "c")
    assert counts(engine)["campaigns"] == 0


def test_duplicates_within_a_file_are_skipped(engine, tmp_path):
    f = tmp_path / "dup.xyz"
    f.write_text(GOOD + GOOD)
    report = import_files(engine, [f], "c", labelled=True)
    assert (report.n_frames, report.n_structures_new, report.n_structures_duplicate) == (4, 2, 2)
    assert counts(engine)["structures"] == 2 and counts(engine)["labels"] == 2


def test_extxyz_writer_round_trips_numpy_scalars_and_strings(tmp_path):
    from bayesal.db.export import format_extxyz

    info = {"a": np.float64(1.0373), "b": np.int64(3), "c": "two words", "d": True,
            "e": 'quote " inside'}
    text = format_extxyz(np.array([1, 8]), np.array([[0.0, 0, 0], [0, 0, 0.97]]),
                         np.zeros((3, 3)), "FFF", info, {"f": np.ones((2, 3)) / 3})
    path = tmp_path / "x.xyz"
    path.write_text(text)
    back = ase.io.read(path)
    assert back.info["a"] == 1.0373 and back.info["b"] == 3 and back.info["c"] == "two words"
    assert back.info["d"] is True and back.info["e"] == 'quote " inside'
    assert (back.arrays["f"] == 1 / 3).all()


@pytest.mark.postgres
def test_postgres_import_lookups_stay_index_scans_in_one_long_transaction(pg_url):
    """50 batches of 200 new structures, then the same 10,000 again, in one transaction (an
    import): new rows get their ids from the insert itself, duplicates are found by a lookup
    that PostgreSQL plans afresh each time (no server-side prepared statement, whose generic
    plan, made from statistics blind to the open transaction's rows, became a scan of the
    campaign: quadratic imports), so it stays an index scan; every id is found once."""
    from ase import Atoms
    from sqlalchemy import text

    from bayesal.db import ensure_schema, make_engine
    from bayesal.db.ingest import (
        PG_ID_LOOKUP,
        get_or_create_campaign,
        structure_row,
        upsert_structures,
    )

    rng = np.random.default_rng(0)
    base = rng.normal(scale=1.5, size=(5, 3))
    engine = make_engine(pg_url)
    ensure_schema(engine, create=True)
    with session_scope(engine) as session:
        cid = get_or_create_campaign(session, "big").id
        batches = [[structure_row(Atoms("H5", positions=base + 0.01 * rng.normal(size=(5, 3))),
                                  cid, "pool") for _ in range(200)] for _ in range(50)]
        first = [upsert_structures(session, rows) for rows in batches]
        assert sum(n for _, n in first) == 10_000
        again = [upsert_structures(session, rows) for rows in batches]
        assert [ids for ids, _ in again] == [ids for ids, _ in first]
        assert sum(n for _, n in again) == 0
        assert len({i for ids, _ in first for i in ids}) == 10_000
        prepared = session.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar()
        assert prepared == 0
        hashes = [row["hash"] for row in batches[-1]]
        plan = "\n".join(session.execute(
            text("EXPLAIN ANALYZE " + PG_ID_LOOKUP.text),
            {"campaign_id": cid, "hashes": hashes}).scalars())
        # each hash one probe of the unique index on both columns, nothing filtered out
        assert "Index Scan using uq_structures_campaign_id_hash" in plan, plan
        assert "((hash)::text = (h.hash)::text)" in plan, plan  # both columns in the probe
        assert "Rows Removed by Filter" not in plan and "Seq Scan on structures" not in plan
    engine.dispose()
