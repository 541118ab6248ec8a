"""The ``smcserve`` command line (entrypoints/) and the client library's request building, without a server:
argument parsing, the potentials ``steer`` sends, plugin options end to end through the proto into
``PotentialSpec``, the particle table, ``--help`` defaults, and the README's example plugin."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from smcserve.client.client import build_request, potential_message
from smcserve.entrypoints.cli import build_parser, main
from smcserve.entrypoints.serve import config_from_args
from smcserve.entrypoints.steer import format_particles, format_weight, parse_option_value, steer_potentials
from smcserve.protos import smcserve_pb2 as pb
from smcserve.smc.potentials import PotentialSpec

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def steer(*argv: str) -> list[dict]:
    return steer_potentials(build_parser().parse_args(["steer", "prompt", *argv]))


def sent(pots: list[dict]) -> list[PotentialSpec]:
    """What the server reads: dicts → GenerateRequest (the client) → wire → PotentialSpec (the server)."""
    req = build_request(messages=[{"role": "user", "content": "x"}], steering={"particles": 2, "potentials": pots})
    wire = pb.GenerateRequest.FromString(req.SerializeToString())
    return [PotentialSpec.from_proto(m) for m in wire.steering.potentials]


# --- generate -------------------------------------------------------------------------------------------
def test_generate_is_greedy_by_default_and_says_so():
    args = build_parser().parse_args(["generate", "What is the capital of France?"])
    assert args.temperature == 0.0
    req = build_request(messages=[{"role": "user", "content": args.prompt}], temperature=args.temperature)
    assert req.sampling.HasField("temperature") and req.sampling.temperature == 0.0  # sent, not left to the server
    text = " ".join(_help("generate").split())
    assert "greedy" in text and "(default: 0, greedy" in text
    assert "`smcserve generate` decodes greedily by default" in README.read_text()


# --- steer: potentials from the command line ---------------------------------------------------------------
def test_cfg_inline_text_or_file_and_format(tmp_path):
    lark = 'start: "yes" | "no"'
    assert steer("--cfg", lark) == [{"kind": "cfg", "grammar": lark, "format": "lark"}]
    f = tmp_path / "yn.lark"
    f.write_text(lark)
    assert steer("--cfg", str(f))[0]["grammar"] == lark  # an existing path is read
    gbnf = 'root ::= "yes" | "no"'
    assert steer("--cfg", gbnf, "--cfg-format", "gbnf")[0] == {"kind": "cfg", "grammar": gbnf, "format": "gbnf"}
    g = tmp_path / "yn.gbnf"
    g.write_text(gbnf)
    assert steer("--cfg", str(g))[0]["format"] == "gbnf"  # from the extension
    assert steer("--cfg", str(g), "--cfg-format", "lark")[0]["format"] == "lark"  # the flag wins
    with pytest.raises(ValueError, match="no such file"):
        steer("--cfg", str(tmp_path / "missing.lark"))
    with pytest.raises(SystemExit):
        steer("--cfg", lark, "--cfg-format", "ebnf")
    specs = sent(steer("--cfg", gbnf, "--cfg-format", "gbnf"))
    assert specs[0].grammar == gbnf and specs[0].format == "gbnf"


def test_json_schema_inline_or_file(tmp_path):
    schema = '{"type": "object", "properties": {"age": {"type": "integer"}}}'
    assert steer("--json-schema", schema) == [{"kind": "json_schema", "schema": schema}]
    f = tmp_path / "s.json"
    f.write_text(schema)
    assert steer("--json-schema", str(f))[0]["schema"] == schema
    with pytest.raises(ValueError, match="no such file"):
        steer("--json-schema", str(tmp_path / "nope.json"))


def test_forbid_case_sensitivity_and_max_tokens_potential():
    (p,) = steer("--forbid", "xyz")
    assert p == {"kind": "forbidden_chars", "chars": "xyz", "case_sensitive": False}
    assert sent([p])[0].case_insensitive is True  # the default: both cases
    (p,) = steer("--forbid", "xyz", "--forbid-case-sensitive")
    assert p["case_sensitive"] is True and sent([p])[0].case_insensitive is False
    with pytest.raises(ValueError, match="--forbid"):
        steer("--forbid-case-sensitive")
    # the max_tokens potential is not the sampling cap --max-tokens
    args = build_parser().parse_args(["steer", "p", "--max-tokens", "40", "--max-tokens-potential", "12"])
    assert args.max_tokens == 40 and steer_potentials(args) == [{"kind": "max_tokens", "n": 12}]
    assert sent(steer_potentials(args))[0].n == 12
    assert steer() == []


def test_weights_per_kind():
    pots = steer(
        "--regex",
        "a+",
        "--regex",
        "b+",
        "--forbid",
        "q",
        "--max-word-length",
        "5",
        "--weight",
        "regex=0.5",
        "--weight",
        "forbid=0",
        "--weight",
        "max-word-length=2",
    )
    w = {(p["kind"], p.get("pattern")): p.get("weight") for p in pots}
    assert w == {
        ("regex", "a+"): 0.5,
        ("regex", "b+"): 0.5,
        ("forbidden_chars", None): 0.0,
        ("max_word_length", None): 2.0,
    }
    specs = sent(pots)
    assert [s.weight for s in specs] == [0.5, 0.5, 2.0, 0.0]
    # by kind name too, and unset weights stay unset (the server's default, 1)
    pots = steer("--ban", "x", "--require", "y", "--weight", "banned_phrases=3")
    assert pots[0]["weight"] == 3.0 and "weight" not in pots[1]
    assert [s.weight for s in sent(pots)] == [3.0, 1.0]
    for bad, msg in (
        (["--weight", "regex=1"], "no regex potential"),
        (["--regex", "a", "--weight", "regex"], "KIND=W"),
        (["--regex", "a", "--weight", "regex=x"], "not a number"),
        (["--regex", "a", "--weight", "regex=-1"], ">= 0"),
    ):
        with pytest.raises(ValueError, match=msg):
            steer(*bad)
    # a bad weight is reported before anything is sent (no server needed)
    assert main(["steer", "p", "--weight", "regex=1", "--address", "127.0.0.1:1"]) == 2


def test_plugin_options_attach_to_the_preceding_potential():
    pots = steer(
        "--potential",
        "max_bytes",
        "--option",
        "limit=40",
        "--option",
        'words=["a", "b"]',
        "--option",
        "name=cat",
        "--option",
        'exact="7"',
        "--option",
        "on=true",
        "--option",
        "x=0.25",
        "--potential",
        "other",
        "--weight",
        "max_bytes=2",
        "--regex",
        "[a-z ]+",
    )
    assert pots == [
        {"kind": "regex", "pattern": "[a-z ]+"},
        {
            "kind": "max_bytes",
            "weight": 2.0,
            "options": {"limit": 40, "words": ["a", "b"], "name": "cat", "exact": "7", "on": True, "x": 0.25},
        },
        {"kind": "other"},
    ]
    # over the wire (google.protobuf.Struct) and back into PotentialSpec.options, integers as int
    specs = sent(pots)
    assert specs[1].kind == "max_bytes" and specs[1].weight == 2.0
    assert specs[1].options == {"limit": 40, "words": ["a", "b"], "name": "cat", "exact": "7", "on": True, "x": 0.25}
    assert isinstance(specs[1].options["limit"], int)
    assert specs[0].options == {} and specs[2].options == {}
    for argv in (
        ["--option", "a=1"],
        ["--potential", "p", "--option", "novalue"],
        ["--potential", "p", "--option", "=1"],
    ):
        with pytest.raises(SystemExit):
            steer(*argv)
    assert parse_option_value("3") == 3 and parse_option_value("abc") == "abc" and parse_option_value("") == ""
    assert parse_option_value('{"k": [1, null]}') == {"k": [1, None]}


def test_potential_spec_from_proto_reads_options():
    m = pb.Potential(weight=0.5, plugin=pb.PluginPotential(name="my_plugin"))
    m.plugin.options.update({"n": 3, "ratio": 0.25, "name": "x", "flags": [1, "a", True, None], "nested": {"k": 2}})
    spec = PotentialSpec.from_proto(m)
    assert spec.kind == "my_plugin" and spec.weight == 0.5
    assert spec.options == {"n": 3, "ratio": 0.25, "name": "x", "flags": [1, "a", True, None], "nested": {"k": 2}}
    assert type(spec.options["n"]) is int and type(spec.options["flags"][0]) is int
    assert PotentialSpec.from_proto(pb.Potential(regex=pb.RegexPotential(pattern="a"))).options == {}
    # a plugin may not take a built-in kind's name (a built-in's parameters have their own message)
    from smcserve.smc.potentials import PotentialError

    bad = pb.Potential(plugin=pb.PluginPotential(name="max_word_length"))
    bad.plugin.options.update({"x": 1})
    with pytest.raises(PotentialError, match=r"plugin\.name: 'max_word_length' is a built-in kind"):
        PotentialSpec.from_proto(bad)


def test_client_library_sends_potentials_as_dicts():
    m = potential_message({"kind": "max_bytes", "weight": 0.5, "options": {"limit": 40, "tags": ["a"]}})
    assert m.WhichOneof("kind") == "plugin" and m.plugin.name == "max_bytes" and m.weight == 0.5
    assert PotentialSpec.from_proto(m).options == {"limit": 40, "tags": ["a"]}
    m = potential_message({"kind": "forbidden_chars", "chars": "e", "case_insensitive": False})
    assert m.WhichOneof("kind") == "forbidden_chars" and m.forbidden_chars.case_sensitive is True
    m = potential_message({"kind": "json_schema", "schema": {"type": "integer"}})
    assert json.loads(m.json_schema.schema) == {"type": "integer"}
    assert not potential_message({"kind": "regex", "pattern": "a", "weight": None}).HasField("weight")
    m = pb.Potential(regex=pb.RegexPotential(pattern="a"))
    assert potential_message(m) is m
    # phrases: case-sensitive by default; case_insensitive (or case_sensitive=False) turns it off
    for kind in ("banned_phrases", "required_phrases"):
        assert sent([{"kind": kind, "phrases": ["Hi"]}])[0].case_insensitive is False
        assert sent([{"kind": kind, "phrases": ["Hi"], "case_insensitive": True}])[0].case_insensitive is True
        assert sent([{"kind": kind, "phrases": ["Hi"], "case_sensitive": False}])[0].case_insensitive is True
    # a built-in kind without parameters still names its kind (the server reports what is missing)
    m = potential_message({"kind": "prompt_intersection"})
    assert m.WhichOneof("kind") == "prompt_intersection" and not m.prompt_intersection.prompts
    assert potential_message({"kind": "prompt_intersection", "prompts": ["q"]}).prompt_intersection.prompts == ["q"]
    assert potential_message({"kind": ""}).WhichOneof("kind") is None  # the server: kind: required
    with pytest.raises(ValueError, match="no_such_field"):
        potential_message({"kind": "regex", "no_such_field": 1})
    with pytest.raises(ValueError, match="phrases: not a parameter of 'regex'"):
        potential_message({"kind": "regex", "pattern": "a", "phrases": ["x"]})
    with pytest.raises(ValueError, match="options"):
        potential_message({"kind": "p", "options": ["not", "a", "dict"]})
    with pytest.raises(ValueError, match="pattern: not a field of a plugin"):
        potential_message({"kind": "p", "pattern": "a"})
    with pytest.raises(ValueError, match="takes no options"):
        potential_message({"kind": "max_word_length", "max_len": 3, "options": {"x": 1}})
    with pytest.raises(ValueError, match="phrases: must be a list"):
        potential_message({"kind": "banned_phrases", "phrases": "abc"})
    # every kind the CLI makes survives the wire
    pots = steer(
        "--regex",
        "a",
        "--cfg",
        'start: "a"',
        "--json-schema",
        '{"type": "integer"}',
        "--max-word-length",
        "4",
        "--forbid",
        "q",
        "--ban",
        "x",
        "--require",
        "y",
        "--max-tokens-potential",
        "9",
        "--potential",
        "max_bytes",
        "--option",
        "limit=3",
    )
    assert [(s.kind, s.weight) for s in sent(pots)] == [
        ("regex", 1.0),
        ("cfg", 1.0),
        ("json_schema", 1.0),
        ("max_word_length", 1.0),
        ("forbidden_chars", 1.0),
        ("banned_phrases", 1.0),
        ("required_phrases", 1.0),
        ("max_tokens", 1.0),
        ("max_bytes", 1.0),
    ]
    wire = build_request(prompt="x", steering={"particles": 2, "potentials": steer("--intersect", "q")})
    assert [p.WhichOneof("kind") for p in wire.steering.potentials] == ["prompt_intersection"]


# --- the particle table -------------------------------------------------------------------------------
def P(text, weight, log_weight, finished=True, reason=""):
    return pb.Particle(text=text, weight=weight, log_weight=log_weight, finished=finished, finish_reason=reason)


def test_particle_table_shows_finish_reasons_and_small_weights():
    res = pb.SteeringResult(
        log_z=-3.5,
        steps=12,
        resamples=4,
        status="ok",
        particles=[
            P("cut", 1.2e-7, -19.0, reason="length"),
            P("best", 0.99999988, -3.0, reason="stop"),
            P("dead", 0.0, float("-inf"), reason="violated"),
        ],
    )
    lines = format_particles(res).splitlines()
    assert lines[0].startswith("log Z = -3.5000") and "end" in lines[1]
    assert re.match(r"\s*1\.0000\s+-3\.000\s+stop\s+'best'", lines[2])
    assert re.match(r"\s*1\.2e-07\s+-19\.000\s+length\s+'cut'", lines[3])
    assert re.match(r"\s*0\s+-inf\s+violated\s+'dead'", lines[4])
    assert lines[-1] == "3 particles: 1 length, 1 stop, 1 violated"
    assert "0.0000" not in format_particles(res)
    # an older server sends no finish_reason: fall back on `finished`
    old = pb.SteeringResult(particles=[P("a", 0.5, -1.0), P("b", 0.5, -1.0, finished=False)])
    table = format_particles(old)
    assert re.search(r"0\.5000\s+-1\.000\s+done\s+'a'", table) and re.search(r"0\.5000\s+-1\.000\s+-\s+'b'", table)
    assert [format_weight(w) for w in (0.0, 1.0, 0.25, 0.001, 0.000999, 3.4e-12)] == [
        "0",
        "1.0000",
        "0.2500",
        "0.0010",
        "1.0e-03",
        "3.4e-12",
    ]


# --- --help shows defaults ------------------------------------------------------------------------------
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _help(command: str) -> str:
    return _subparsers()[command].format_help()


def test_every_help_shows_defaults():
    for name, parser in _subparsers().items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if not action.option_strings or action.default in (None, False, [], "", argparse.SUPPRESS):
                continue
            assert action.help, (name, action.option_strings)
            shown = parser._get_formatter()._get_help_string(action) % {**vars(action), "default": action.default}
            assert "default" in shown.lower(), (name, action.option_strings, shown)
        assert "(default:" in text, name
    steer_help = " ".join(_help("steer").split())
    for piece in (
        "--particles PARTICLES N, the number of particles (default: 16)",
        "(default: without_replacement)",
        "--cfg-format {lark,gbnf}",
        "--weight KIND=W",
        "--option KEY=VALUE",
        "--max-tokens-potential N",
        "--forbid-case-sensitive",
        "stop (EOS), length",
    ):
        assert piece in steer_help, piece
    assert "(default: 50051)" in " ".join(_help("serve").split())
    assert "(default: 600.0)" in " ".join(_help("bench").split())


# --- serve: the flags are ServeConfig's fields ---------------------------------------------------------------
def test_serve_flags_are_the_config_fields():
    from dataclasses import fields

    from smcserve.engine.dtype import CANDIDATES
    from smcserve.scheduler.conductor.policies import POLICY_NAMES
    from smcserve.scheduler.stack import ServeConfig

    serve = _subparsers()["serve"]
    flags = {a.dest: a for a in serve._actions if a.option_strings and a.dest != "help"}
    assert set(flags) == {f.name for f in fields(ServeConfig)}
    for f in fields(ServeConfig):
        (flag,) = flags[f.name].option_strings
        assert flag == ("--no-" if f.default is True else "--") + f.name.replace("_", "-")
        assert flags[f.name].default == f.default and f.metadata["help"] in flags[f.name].help
    # the flags the README and deploy/ scripts use keep their names
    for flag in ("--block-size", "--redis-url", "--ray-address", "--prefill-workers", "--no-prefix-cache", "--port"):
        assert flag in serve._option_string_actions, flag
    assert tuple(flags["policy"].choices) == POLICY_NAMES
    assert tuple(flags["dtype"].choices) == ("auto", *CANDIDATES)
    # no flags: the config's own defaults; each flag sets its field, with the field's type
    assert config_from_args(build_parser().parse_args(["serve"])) == ServeConfig()
    args = ["serve", "--block-size", "32", "--redis-url", "redis://h:1", "--worker-cpus", "0.5", "--no-prefix-cache"]
    cfg = config_from_args(build_parser().parse_args([*args, "--policy", "load", "--slo-ttft-ms", "250"]))
    assert (cfg.block_size, cfg.redis_url, cfg.worker_cpus, cfg.prefix_cache) == (32, "redis://h:1", 0.5, False)
    assert (cfg.policy, cfg.slo_ttft_ms) == ("load", 250.0) and type(cfg.slo_ttft_ms) is float
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--policy", "nearest"])
    help_text = " ".join(_help("serve").split())
    assert "--no-prefix-cache turn off the prefix cache" in help_text and "(default: on)" in help_text


def test_steer_schemes_are_the_smc_schemes():
    from smcserve.smc import SCHEMES
    from smcserve.smc.step import WITHOUT_REPLACEMENT

    (scheme,) = (a for a in _subparsers()["steer"]._actions if a.dest == "scheme")
    assert tuple(scheme.choices) == (WITHOUT_REPLACEMENT, *SCHEMES) and scheme.default == WITHOUT_REPLACEMENT


def test_client_commands_do_not_import_the_server():
    """``smcserve generate`` (info, bench) builds only its own flags: no torch, Ray or scheduler imported."""
    code = (
        "import sys\nfrom smcserve.entrypoints.cli import main\n"
        "try:\n    main(['generate', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'ray', 'smcserve.scheduler.stack', 'smcserve.smc') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "--temperature" in out and out.strip().endswith("[]")


# --- the README's example plugin ------------------------------------------------------------------------
def _readme_file(name: str) -> str:
    """The README code block whose first line is ``# <name>``."""
    for block in re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), re.S):
        if block.startswith(f"# {name}\n"):
            return block
    raise AssertionError(f"no README code block for {name}")


@pytest.fixture(scope="module")
def vocab():
    from transformers import AutoTokenizer

    from smcserve.engine.model import resolve_model_path
    from smcserve.smc.vocab import get_vocab

    return get_vocab(AutoTokenizer.from_pretrained(resolve_model_path(None)))


def test_readme_plugin_is_a_working_entry_point(tmp_path, monkeypatch, vocab):
    """Install the README's plugin package as pip would (a module + a dist-info with entry_points.txt on
    sys.path), then drive it as the CLI and the server would: parsed args → proto → PotentialSpec → plugin."""
    from smcserve.smc import potentials as P_

    project = tomllib.loads(_readme_file("smcserve-max-bytes/pyproject.toml"))
    eps = project["project"]["entry-points"]["smcserve.potentials"]
    assert eps == {"max_bytes": "smcserve_max_bytes:max_bytes"}
    (tmp_path / "smcserve_max_bytes.py").write_text(_readme_file("smcserve-max-bytes/smcserve_max_bytes.py"))
    dist = tmp_path / "smcserve_max_bytes-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: smcserve-max-bytes\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[smcserve.potentials]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "max_bytes" in P_.load_plugins(reload=True) and "max_bytes" in P_.potential_kinds()
        # the README's CLI example
        readme = README.read_text()
        assert "--potential max_bytes --option limit=" in readme
        (spec,) = sent(steer("--potential", "max_bytes", "--option", "limit=12"))
        assert spec.options == {"limit": 12}
        (pot,) = P_.build_potentials([spec], vocab)
        ids = vocab.tokenizer.encode("Hello world, how are you")
        text = ""
        for t in ids:  # "Hello world, how are you": ASCII, 12 bytes fit
            text += vocab.tokenizer.decode([t])
            fits = len(text) <= 12
            assert bool(pot.mask()[t]) == fits, text  # the mask allows exactly the tokens that fit
            assert pot.advance(t) == (0.0 if fits else float("-inf")), text
            if not fits:
                break
        assert text == "Hello world, how"  # " how" was the first token past the limit
        clone = pot.clone()
        assert clone.used == pot.used and clone is not pot
        fresh = P_.build_potential(spec, vocab)
        assert bool(fresh.mask()[vocab.eos_ids[0]])  # ending is always allowed
        with pytest.raises(P_.PotentialError, match=r"steering\.potentials\[0\]: options\.limit"):
            P_.build_potential(sent(steer("--potential", "max_bytes", "--option", "limit=0"))[0], vocab)
    finally:
        sys.modules.pop("smcserve_max_bytes", None)
        monkeypatch.undo()
        P_.load_plugins(reload=True)
