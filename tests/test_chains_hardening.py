"""Issue #21: `rankloss chains make` on resume, on inputs it would destroy, on repeated ids, and on
damaged partial, options and chains files."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rankloss.chains import InputError, iter_records, make_chains_file, read_chains
from rankloss.cli import main
from rankloss.integrations.records import read_chain_records

CAPTIONS = [
    "A man in a red shirt walks two dogs along a wooden pier. He throws a ball into the water.",
    "A chef slices a tomato on a cutting board, then he pours oil into a pan. Three eggs sit in a bowl.",
    "A girl in a yellow jacket rides a bicycle down a street. A black car is parked on the left.",
    "Two players in green uniforms kick a ball across a large field. The goalkeeper jumps to the right.",
]

# RANKLOSS_FUZZ_EXAMPLES=2000 for a longer search.
FUZZ = settings(
    max_examples=int(os.environ.get("RANKLOSS_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _write(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def _rows(n: int, prefix: str = "clip") -> list[dict]:
    return [{"video": f"{prefix}{i}.mp4", "caption": CAPTIONS[i % len(CAPTIONS)]} for i in range(n)]


def _ids(path) -> list[str]:
    return [r["id"] for r in read_chains(path)]


def _check_counts(s) -> None:
    """Every record read is written, done by an earlier run, skipped or dropped: none is lost."""
    new = s.chains_written - s.chains_resumed
    assert s.records_read == new + s.records_done_before + s.lines_skipped + s.chains_dropped, s.to_dict()
    if s.complete:
        assert s.records_done_before == s.chains_resumed


# --------------------------------------------------------------------------------------------------
# 3. Resuming from another input
# --------------------------------------------------------------------------------------------------
def test_resume_refuses_another_input(tmp_path, capsys) -> None:
    shard0 = _write(tmp_path / "shard0.jsonl", _rows(4, "a"))
    shard1 = _write(tmp_path / "shard1.jsonl", _rows(4, "b"))
    out = str(tmp_path / "out.jsonl")
    argv = ["chains", "make", "--out", out, "--length", "3", "--no-progress"]
    assert main([*argv, "--in", shard0, "--max-chains", "2"]) == 0
    capsys.readouterr()
    # Before #21: exit 0 and an output holding shard0's first two chains plus all of shard1.
    assert main([*argv, "--in", shard1]) == 1
    err = capsys.readouterr().err
    assert f"{out}.partial was made from the input {shard0!r}" in err
    assert f"this run's input {shard1!r}" in err and "another file" in err
    assert "same --in" in err and "--no-resume" in err
    assert not os.path.exists(out) and _ids(out + ".partial") == ["a0.mp4", "a1.mp4"]
    # The same input resumes; --no-resume starts over with the other one.
    assert main([*argv, "--in", shard0]) == 0
    assert _ids(out) == [f"a{i}.mp4" for i in range(4)]
    os.remove(out)
    assert main([*argv, "--in", shard0, "--max-chains", "1"]) == 0
    assert main([*argv, "--in", shard1, "--no-resume"]) == 0
    assert _ids(out) == [f"b{i}.mp4" for i in range(4)]


def test_resume_refuses_an_input_edited_in_place(tmp_path) -> None:
    rows = _rows(4)
    path = _write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    make_chains_file(path, out, length=3, max_chains=2)
    rows[3]["caption"] = CAPTIONS[0]  # a record not yet made changes: the partial file looks fine
    _write(path, rows)
    with pytest.raises(ValueError, match=r"has changed since that run \(edited in place\?\)") as e:
        make_chains_file(path, out, length=3)
    assert f"{out}.partial was made from the input {path!r}" in str(e.value) and "--no-resume" in str(e.value)


def test_resume_accepts_a_copy_of_the_input(tmp_path) -> None:
    path = _write(tmp_path / "in.jsonl", _rows(5))
    ref = tmp_path / "ref.jsonl"
    make_chains_file(path, ref, length=3)
    out = tmp_path / "out.jsonl"
    make_chains_file(path, out, length=3, max_chains=2)
    copy = str(tmp_path / "copy.jsonl")
    shutil.copyfile(path, copy)
    os.utime(copy, (1_000_000_000, 1_000_000_000))  # another path and modification time, same bytes
    s = make_chains_file(copy, out, length=3)
    assert s.complete and s.chains_resumed == 2 and out.read_bytes() == ref.read_bytes()
    _check_counts(s)
    os.remove(out)
    # Touching the input (same bytes, new mtime) resumes too.
    make_chains_file(path, out, length=3, max_chains=2)
    os.utime(path, (2_000_000_000, 2_000_000_000))
    assert make_chains_file(path, out, length=3).complete and out.read_bytes() == ref.read_bytes()


def test_old_partial_without_an_input_record(tmp_path) -> None:
    """A partial output made before inputs were recorded resumes when its chains are this input's."""
    shard0 = _write(tmp_path / "shard0.jsonl", _rows(4, "a"))
    shard1 = _write(tmp_path / "shard1.jsonl", _rows(4, "b"))
    out = tmp_path / "out.jsonl"
    options = tmp_path / "out.jsonl.partial.options.json"

    def old_style_partial() -> None:
        make_chains_file(shard0, out, length=3, max_chains=2, resume=False)
        saved = json.loads(options.read_text())
        del saved["input"]
        options.write_text(json.dumps(saved))

    old_style_partial()
    with pytest.raises(
        ValueError, match=r"out\.jsonl\.partial:1: cannot resume: the id 'a0\.mp4' is no record"
    ):
        make_chains_file(shard1, out, length=3)
    assert _ids(str(out) + ".partial") == ["a0.mp4", "a1.mp4"]  # untouched
    s = make_chains_file(shard0, out, length=3)
    assert s.complete and s.chains_resumed == 2 and _ids(out) == [f"a{i}.mp4" for i in range(4)]
    # A damaged input record (not missing, but unreadable) is refused, naming the options file.
    os.remove(out)
    make_chains_file(shard0, out, length=3, max_chains=2)
    saved = json.loads(options.read_text())
    saved["input"] = "garbage"
    options.write_text(json.dumps(saved))
    with pytest.raises(
        ValueError, match=r"record of the input it was made from in .*options\.json is damaged"
    ):
        make_chains_file(shard0, out, length=3)


def test_resume_checks_every_chain_against_the_input(tmp_path) -> None:
    path = _write(tmp_path / "in.jsonl", _rows(4))
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    make_chains_file(path, out, length=3, max_chains=2)
    good = partial.read_bytes()
    lines = good.splitlines(keepends=True)
    # A repeated line (the file would hold the chain twice).
    partial.write_bytes(good + lines[1])
    with pytest.raises(ValueError, match=r"partial:3: cannot resume: the id 'clip1\.mp4' appears a second"):
        make_chains_file(path, out, length=3)
    # A line whose id was changed to that of a later record (that record would never be made).
    rec = json.loads(lines[1])
    rec["id"] = "clip3.mp4"
    partial.write_bytes(lines[0] + (json.dumps(rec) + "\n").encode())
    with pytest.raises(ValueError, match=r"partial:2: .*'clip3\.mp4' does not start from that input record"):
        make_chains_file(path, out, length=3)


# --------------------------------------------------------------------------------------------------
# 4. An input that the run would overwrite or delete
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".partial", ".partial.options.json", ".partial.options.json.tmp"])
def test_input_that_is_a_file_of_the_writer_is_refused(tmp_path, capsys, suffix) -> None:
    out = str(tmp_path / "chains.jsonl")
    path = _write(out + suffix, _rows(3))
    before = open(path, "rb").read()
    # Before #21 (.partial): the input was deleted, and the run said "0 written ... complete".
    with pytest.raises(ValueError, match="this run would overwrite or delete it") as e:
        make_chains_file(path, out, length=3, resume=False)
    assert f"the input {path!r} is the " in str(e.value) and repr(out) in str(e.value)
    assert open(path, "rb").read() == before and not os.path.exists(out)
    rc = main(["chains", "make", "--in", path, "--out", out, "--no-resume", "--no-progress"])
    assert rc == 1 and f"the input {path!r}" in capsys.readouterr().err
    assert open(path, "rb").read() == before


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
@pytest.mark.parametrize("target", ["", ".partial"])
def test_input_linked_to_a_file_of_the_writer_is_refused(tmp_path, link, target) -> None:
    out = str(tmp_path / "chains.jsonl")
    real = _write(out + target, _rows(3))
    before = open(real, "rb").read()
    path = str(tmp_path / "captions.jsonl")
    (os.symlink if link == "symlink" else os.link)(real, path)
    with pytest.raises(ValueError, match="a link to it, or the same file") as e:
        make_chains_file(path, out, length=3, resume=False, overwrite=True)
    assert repr(path) in str(e.value) and repr(out + target) in str(e.value)
    assert open(real, "rb").read() == before


def test_summary_json_may_not_be_the_input_or_the_output(tmp_path, capsys) -> None:
    path = _write(tmp_path / "in.jsonl", _rows(2))
    out = str(tmp_path / "out.jsonl")
    before = open(path, "rb").read()
    for target in (path, out):
        rc = main(["chains", "make", "--in", path, "--out", out, "--summary-json", target, "--no-progress"])
        assert rc == 1 and "give --summary-json a path of its own" in capsys.readouterr().err
    assert open(path, "rb").read() == before and not os.path.exists(out)


# --------------------------------------------------------------------------------------------------
# 5. Repeated ids
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ids, expected",
    [
        (["a", "a", "a#2"], ["a", "a#3", "a#2"]),  # a later real a#2 keeps its id
        (["a", "a#2", "a"], ["a", "a#2", "a#3"]),  # an earlier one too
        (["a", "a", "a#2", "a#3", "a", "a#2"], ["a", "a#4", "a#2", "a#3", "a#5", "a#2#2"]),
        (["x", "x", "x"], ["x", "x#2", "x#3"]),  # the usual case is as before
    ],
)
def test_renamed_ids_never_take_a_real_id(tmp_path, ids, expected) -> None:
    rows = [{"id": rid, "video": f"v{i}.mp4", "caption": CAPTIONS[i % 4]} for i, rid in enumerate(ids)]
    path = _write(tmp_path / "in.jsonl", rows)
    recs = list(iter_records(path))
    assert [r.id for r in recs] == expected
    assert [r.renamed_from for r in recs] == [None if i == e else i for i, e in zip(ids, expected)]
    from rankloss.chains.formats import input_index

    assert list(input_index(path)) == expected
    # Before #21, ["a", "a", "a#2"]: "3 read, 0 skipped", 2 chains written, the real a#2 lost.
    s = make_chains_file(path, tmp_path / "out.jsonl", length=3)
    assert s.complete and s.records_read == len(ids) and s.chains_written == len(ids)
    assert _ids(tmp_path / "out.jsonl") == expected
    assert s.ids_renamed == sum(i != e for i, e in zip(ids, expected))
    _check_counts(s)


def test_renamed_ids_resume(tmp_path) -> None:
    ids = ["a", "a", "a#2", "b", "a"]
    rows = [{"id": rid, "video": f"v{i}.mp4", "caption": CAPTIONS[i % 4]} for i, rid in enumerate(ids)]
    path = _write(tmp_path / "in.jsonl", rows)
    make_chains_file(path, tmp_path / "ref.jsonl", length=3)
    out = tmp_path / "out.jsonl"
    for _ in range(4):
        s = make_chains_file(path, out, length=3, max_chains=2)
        _check_counts(s)
        if s.complete:
            break
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


@given(st.lists(st.sampled_from(["a", "a#2", "a#3", "a#2#2", "b", "b#2", "1", "1#2"]), max_size=12))
@FUZZ
def test_unique_ids_property(ids) -> None:
    with tempfile.TemporaryDirectory() as d:
        rows = [{"id": rid, "video": "v.mp4", "caption": "A red car."} for rid in ids]
        recs = list(iter_records(_write(os.path.join(d, "in.jsonl"), rows)))
    got = [r.id for r in recs]
    assert len(got) == len(ids) and len(set(got)) == len(got)
    firsts = {rid: n for n, rid in reversed(list(enumerate(ids)))}
    for n, (rid, new) in enumerate(zip(ids, got)):
        assert (new == rid) == (firsts[rid] == n)  # a first occurrence keeps its id; a repeat is renamed
        assert new.startswith(rid)


def test_every_record_is_counted(tmp_path) -> None:
    rows = [
        {"video": "clip0.mp4", "caption": CAPTIONS[0]},
        {"video": "clip1.mp4", "caption": CAPTIONS[1]},
        "{oops",  # bad: skipped
        {"video": "same.mp4", "caption": CAPTIONS[1]},
        {"video": "same.mp4", "caption": CAPTIONS[3]},  # renamed
        {"video": "short.mp4", "caption": "A dog runs."},  # no count to change: dropped
        {"video": "clip0.mp4#2", "caption": CAPTIONS[3]},
        {"video": "clip0.mp4", "caption": CAPTIONS[0]},  # renamed to clip0.mp4#3
    ]
    path = _write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    runs = []
    while not runs or not runs[-1].complete:
        runs.append(make_chains_file(path, out, length=2, types="count", max_chains=2))
        _check_counts(runs[-1])
    assert len(runs) == 3 and runs[1].records_done_before == 2
    s = runs[-1]
    assert s.records_read == 8 and s.chains_written == 6 and s.lines_skipped == 1 and s.chains_dropped == 1
    assert sorted(s.renamed) == ["clip0.mp4 -> clip0.mp4#3", "same.mp4 -> same.mp4#2"]
    assert len(set(_ids(out))) == 6 and "4 done by an earlier run" in s.format()


# --------------------------------------------------------------------------------------------------
# Damaged partial, options and chains files
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """An input, its uninterrupted chains output, and the partial + options files of a run stopped
    after 3 of its 5 chains."""
    d = tmp_path_factory.mktemp("hardening")
    path = _write(d / "in.jsonl", _rows(5))
    make_chains_file(path, d / "ref.jsonl", length=3)
    make_chains_file(path, d / "stop.jsonl", length=3, max_chains=3)
    return {
        "input": path,
        "ref": (d / "ref.jsonl").read_bytes(),
        "partial": (d / "stop.jsonl.partial").read_bytes(),
        "options": (d / "stop.jsonl.partial.options.json").read_bytes(),
    }


def _damage(data: bytes, how: str, offset: float, junk: bytes) -> bytes:
    at = int(offset * len(data))
    if how == "truncate":
        return data[:at]
    if how == "overwrite":
        return data[:at] + junk + data[at + len(junk) :]
    return data[:at] + junk + data[at:]  # insert


def _assert_names_a_file(exc: BaseException, *paths: str) -> None:
    assert type(exc) in (ValueError, InputError), f"{type(exc).__name__}: {exc}"
    assert any(p in str(exc) for p in paths), str(exc)


@given(
    which=st.sampled_from(["partial", "options"]),
    how=st.sampled_from(["truncate", "overwrite", "insert"]),
    offset=st.floats(0, 1),
    junk=st.binary(min_size=1, max_size=6),
)
@FUZZ
def test_resume_from_damaged_files(run_files, which, how, offset, junk) -> None:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.jsonl")
        files = {"partial": out + ".partial", "options": out + ".partial.options.json"}
        for name, p in files.items():
            data = run_files[name]
            with open(p, "wb") as f:
                f.write(_damage(data, how, offset, junk) if name == which else data)
        try:
            s = make_chains_file(run_files["input"], out, length=3)
        except Exception as exc:  # noqa: BLE001 - the error must be a clear one, naming the file
            _assert_names_a_file(exc, *files.values())
            event("refused: " + re.sub(r"'[^']*'|\S*/\S*", "_", str(exc))[:50])
            return
        event("resumed")
        got = open(out, "rb").read()
    assert s.complete
    _check_counts(s)
    ref = [json.loads(line) for line in run_files["ref"].splitlines()]
    recs = [json.loads(line) for line in got.splitlines() if line.strip()]
    assert Counter(r["id"] for r in recs) == Counter(r["id"] for r in ref)  # each exactly once
    by_id = {r["id"]: r for r in ref}
    assert all(
        (r["video"], r["chain"][0]) == (by_id[r["id"]]["video"], by_id[r["id"]]["chain"][0]) for r in recs
    )
    if which == "partial" and how == "truncate":  # an interrupted write: the run goes on as if never stopped
        assert got == run_files["ref"]


@given(
    how=st.sampled_from(["truncate", "overwrite", "insert"]),
    offset=st.floats(0, 1),
    junk=st.binary(min_size=1, max_size=6),
)
@FUZZ
def test_reading_damaged_chains_files(run_files, how, offset, junk) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "chains.jsonl")
        with open(path, "wb") as f:
            f.write(_damage(run_files["ref"], how, offset, junk))
        where = re.compile(re.escape(path) + r":\d+: ")
        try:
            list(read_chains(path))
        except Exception as exc:  # noqa: BLE001
            _assert_names_a_file(exc, path)
            assert where.match(str(exc)), str(exc)  # file:line
        try:
            read_chain_records(path)
        except Exception as exc:  # noqa: BLE001
            _assert_names_a_file(exc, path)
            # read_chains' errors name file:line; read_chain_records' own checks name the record
            assert where.match(str(exc)) or re.match(re.escape(path) + r": record \d+: ", str(exc)), str(exc)


def test_damaged_options_file_is_named(tmp_path) -> None:
    path = _write(tmp_path / "in.jsonl", _rows(3))
    out = tmp_path / "out.jsonl"
    make_chains_file(path, out, length=3, max_chains=1)
    options = tmp_path / "out.jsonl.partial.options.json"
    options.write_bytes(b"\xff\xfe" + options.read_bytes()[2:])  # not UTF-8
    with pytest.raises(ValueError, match=r"no readable record of the options .*options\.json.*--no-resume"):
        make_chains_file(path, out, length=3)


def test_read_chains_counts_lines_by_newline_only(tmp_path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_bytes(
        b'{"id": "a", "chain": ["x", "y"]}\r\n{"id": "b", "chain": ["x", "y"]}\r\n{"id": "c"\rx\n'
    )
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: invalid JSON")):
        list(read_chains(path))
