"""Bad inputs of the caption-chain tools: resuming with other options, bytes that are not text, JSON that
the parser refuses, repeated ids, and a command line that needs no torch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rankloss.chains import ChainWriter, InputError, iter_records, make_chains_file, read_chains
from rankloss.chains.formats import count_records
from rankloss.cli import main

CAPTIONS = [
    "A man in a red shirt walks two dogs along a wooden pier. He throws a ball into the water.",
    "A chef slices a tomato on a cutting board, then he pours oil into a pan. Three eggs sit in a bowl.",
    "A girl in a yellow jacket rides a bicycle down a street. A black car is parked on the left.",
]


def _lines(n: int) -> list[bytes]:
    return [json.dumps({"video": f"v{i}.mp4", "caption": CAPTIONS[i % 3]}).encode() for i in range(n)]


def _write(path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


# --------------------------------------------------------------------------------------------------
# Resuming with other options
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        ({"length": 3}, r"length 4 there, 3 now"),
        ({"seed": 7}, r"seed 0 there, 7 now"),
        ({"types": "count,spatial"}, r"types \['object', .*\] there, \['count', 'spatial'\] now"),
        ({"min_length": 3}, r"min_length 2 there, 3 now"),
    ],
)
def test_resume_with_other_options_is_refused(tmp_path, change, message):
    path = _write(tmp_path / "in.jsonl", _lines(6))
    out = tmp_path / "out.jsonl"
    make_chains_file(path, out, length=4, seed=0, max_chains=2)
    partial = tmp_path / "out.jsonl.partial"
    before = partial.read_bytes()
    with pytest.raises(ValueError, match=message) as info:
        make_chains_file(path, out, **{"length": 4, "seed": 0, **change})
    assert "--no-resume (resume=False) to discard it and start over" in str(info.value)
    assert partial.read_bytes() == before and not out.exists()  # nothing mixed in
    # The same options resume; other options with resume=False start over.
    s = make_chains_file(path, out, length=4, seed=0, max_chains=1)
    assert s.chains_resumed == 2 and s.chains_written == 3
    s = make_chains_file(path, out, resume=False, **{"length": 4, "seed": 0, **change})
    assert s.complete and s.chains_resumed == 0 and s.chains_written == 6
    assert not os.path.exists(str(partial) + ".options.json")


def test_resume_of_a_partial_output_without_its_options_is_refused(tmp_path):
    path = _write(tmp_path / "in.jsonl", _lines(3))
    (tmp_path / "out.jsonl.partial").write_text('{"id": "v0.mp4", "chain": ["a", "b"]}\n')
    with pytest.raises(ValueError, match=r"no readable record of the options .* start over"):
        make_chains_file(path, tmp_path / "out.jsonl", length=3)
    # An empty partial output (stopped before its first chain) has nothing to mix: it resumes.
    (tmp_path / "e.jsonl.partial").write_text("")
    assert make_chains_file(path, tmp_path / "e.jsonl", length=3).complete
    # A writer used without options does not check (the library's own use of it).
    ChainWriter(tmp_path / "out.jsonl").close()


def test_cli_refuses_to_resume_with_other_options(tmp_path, capsys):
    path = _write(tmp_path / "in.jsonl", _lines(4))
    args = ["chains", "make", "--in", path, "--out", str(tmp_path / "o.jsonl"), "--no-progress"]
    assert main([*args, "--max-chains", "2"]) == 0
    capsys.readouterr()
    assert main([*args, "--length", "3", "--seed", "7"]) == 1
    err = capsys.readouterr().err
    assert "length 6 there, 3 now; seed 0 there, 7 now" in err and "--no-resume" in err
    assert main([*args, "--length", "3", "--seed", "7", "--no-resume"]) == 0
    assert {len(r["chain"]) for r in read_chains(tmp_path / "o.jsonl")} == {3}


# --------------------------------------------------------------------------------------------------
# Bytes that are not text
# --------------------------------------------------------------------------------------------------
def test_invalid_utf8_line_is_a_bad_line(tmp_path):
    lines = _lines(4)
    lines[1] = lines[1].replace(b"chef", b"ch\xffef")
    path = _write(tmp_path / "in.jsonl", lines)
    s = make_chains_file(path, tmp_path / "out.jsonl", length=3)
    assert s.lines_skipped == 1 and s.chains_written == 3
    col = lines[1].index(b"\xff") + 1
    assert s.skipped == [f"{path}:2: not valid utf-8 text: byte 0xff at column {col}"]
    assert "\ufffd" not in (tmp_path / "out.jsonl").read_text(encoding="utf-8")
    with pytest.raises(InputError, match=rf"in\.jsonl:2: not valid utf-8 text: byte 0xff at column {col}"):
        make_chains_file(path, tmp_path / "strict.jsonl", length=3, strict=True)
    # An explicit encoding reads the same bytes as text.
    s = make_chains_file(path, tmp_path / "latin.jsonl", length=3, encoding="latin-1")
    assert s.lines_skipped == 0 and "chÿef" in (tmp_path / "latin.jsonl").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match=r"unknown encoding 'utf-9'"):
        make_chains_file(path, tmp_path / "x.jsonl", encoding="utf-9")


def test_byte_order_mark_and_escaped_surrogates(tmp_path):
    lines = _lines(3)
    lines[0] = b"\xef\xbb\xbf" + lines[0]  # a UTF-8 byte-order mark, as some editors write
    lines[2] = json.dumps({"video": "v2.mp4", "caption": "A dog \ud800 runs."}).encode()  # "\\ud800"
    path = _write(tmp_path / "in.jsonl", lines)
    s = make_chains_file(path, tmp_path / "out.jsonl", length=3)
    assert s.chains_written == 2
    assert s.skipped == [f"{path}:3: a string holds the unpaired surrogate \\ud800, which is not text"]
    arr = tmp_path / "in.json"
    arr.write_bytes(b"\xef\xbb\xbf[" + b",".join(_lines(2)) + b"]")
    assert [r.id for r in iter_records(arr)] == ["v0.mp4", "v1.mp4"]


def test_json_array_with_bad_bytes_names_file_and_position(tmp_path):
    lines = _lines(3)
    lines[1] = lines[1].replace(b"chef", b"ch\xfe\xffef")
    path = tmp_path / "in.json"
    path.write_bytes(b"[\n" + b",\n".join(lines) + b"\n]\n")
    items = list(iter_records(path))
    assert [type(i).__name__ for i in items] == ["CaptionRecord", "InputError", "CaptionRecord"]
    assert str(items[1]) == f"{path}:item 1: not valid utf-8 text: byte 0xfe"
    # Outside a string the document itself is broken: an error naming the file and line.
    path.write_bytes(b'[\n{"video": "a", "caption": "x"},\n\xff\n]')
    with pytest.raises(InputError, match=r"in\.json:3: not valid utf-8 text: byte 0xff at column 1"):
        list(iter_records(path))
    assert (
        main(["chains", "make", "--in", str(path), "--out", str(tmp_path / "o.jsonl"), "--no-progress"]) == 1
    )


def test_json_the_parser_refuses_is_a_bad_line(tmp_path):
    # A 5000-digit number (beyond Python's int conversion limit) and nesting too deep for the parser
    # raised ValueError / RecursionError out of the run, with no file or line.
    lines = _lines(3)
    lines[0] = b'{"video": "a", "caption": "x", "n": ' + b"1" * 5000 + b"}"
    lines[1] = b"[" * 100_000
    path = _write(tmp_path / "in.jsonl", lines)
    s = make_chains_file(path, tmp_path / "out.jsonl", length=3)
    assert s.chains_written == 1 and s.lines_skipped == 2
    assert s.skipped[0].startswith(f"{path}:1: invalid JSON: Exceeds the limit")
    assert s.skipped[1].startswith(f"{path}:2: invalid JSON")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    with pytest.raises(InputError, match=r"deep\.json: invalid JSON"):
        list(iter_records(deep))


def test_read_chains_names_the_line_of_bad_bytes(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"id": "a", "chain": ["x", "y"]}\n{"id": "b", "chain": ["\xff"]}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: corrupt chains file: not valid utf-8 text: byte 0xff"):
        list(read_chains(path))


_JSON_LINE = st.builds(
    lambda v, c: json.dumps({"video": v, "caption": c}).encode(), st.text(min_size=1), st.text()
)


@given(st.lists(st.one_of(_JSON_LINE, st.binary(max_size=40)), max_size=8))
def test_any_bytes_give_records_or_bad_lines(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("bytes") / "in.jsonl"
    path.write_bytes(b"\n".join(lines))
    items = list(iter_records(path))  # never raises on a JSONL file
    assert len(items) == count_records(path)
    raw = re.split(r"\r\n|\r|\n", path.read_bytes().decode("utf-8", "surrogateescape"))
    for item in items:
        if isinstance(item, InputError):
            assert str(item).startswith(f"{path}:")
            continue
        line = raw[int(item.where.rsplit(":", 1)[1]) - 1]
        line.encode("utf-8")  # a record only from a line of valid UTF-8 text (no undecodable bytes)
        item.caption.encode("utf-8")  # and text that can be written out


def test_directories_as_input_or_output_are_named(tmp_path, capsys):
    path = _write(tmp_path / "in.jsonl", _lines(2))
    # An output directory used to be "already exists (a finished run)", and with --overwrite the run
    # did all its work and then failed to rename its partial file onto the directory.
    for extra in ([], ["--overwrite"]):
        assert main(["chains", "make", "--in", path, "--out", str(tmp_path), "--no-progress", *extra]) == 1
        assert f"output {str(tmp_path)!r} is a directory; give a file path" in capsys.readouterr().err
    assert not os.path.exists(str(tmp_path) + ".partial")
    with pytest.raises(IsADirectoryError, match=r"input .* is a directory, expected a captions file"):
        make_chains_file(tmp_path, tmp_path / "o.jsonl")


# --------------------------------------------------------------------------------------------------
# Repeated ids; no torch for the rules engine
# --------------------------------------------------------------------------------------------------
def test_repeated_ids_are_counted_in_the_summary(tmp_path):
    lines = [json.dumps({"video": "x.mp4", "caption": c}).encode() for c in CAPTIONS]
    s = make_chains_file(_write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl", length=3)
    assert s.ids_renamed == 2 and s.renamed == ["x.mp4 -> x.mp4#2", "x.mp4 -> x.mp4#3"]
    assert "repeated ids: 2 record(s) took an id already used" in s.format()
    assert "x.mp4 -> x.mp4#2" in s.format() and s.to_dict()["ids_renamed"] == 2


def test_chains_make_with_the_rules_engine_does_not_import_torch(tmp_path):
    path = _write(tmp_path / "in.jsonl", _lines(3))
    code = (
        "import sys\n"
        "from rankloss.cli import main\n"
        f"rc = main(['chains', 'make', '--in', {path!r}, '--out', {str(tmp_path / 'o.jsonl')!r}])\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'triton') if m in sys.modules)\n"
        "assert rc == 0 and not heavy, (rc, heavy)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.jsonl").exists()
