"""Spec parsing for --source/--sink: kinds, options, and one clear error for a bad spec."""

from __future__ import annotations

import pytest

from spade_edge.runtime.errors import ConfigError
from spade_edge.station.sinks import open_sink
from spade_edge.station.sources import open_source
from spade_edge.station.spec import parse_spec

KINDS = {"watch": ("settle", "poll"), "camera": ("fps",), "mqtt": ("buffer",)}


def test_options_and_targets() -> None:
    s = parse_spec("watch:/data/in?settle=0&poll=0.05", KINDS, "source")
    assert (s.kind, s.target, s.options) == ("watch", "/data/in", {"settle": "0", "poll": "0.05"})
    assert s.number("settle", 1.0) == 0.0
    s = parse_spec("camera:http://cam.local/stream?user=x", KINDS, "source")
    assert s.target == "http://cam.local/stream?user=x" and s.options == {}
    s = parse_spec("mqtt://127.0.0.1:1883/line/a?buffer=5", KINDS, "sink")
    assert s.target == "mqtt://127.0.0.1:1883/line/a" and s.integer("buffer", 1) == 5


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("ftp:/x", "unknown kind"),
        ("watch", "unknown kind"),
        ("watch:", "nothing after"),
        ("watch:/d?settle=abc", "not a number"),
        ("watch:/d?settle=-1", ">= 0"),
        ("watch:/d?settel=1", "unknown option"),
    ],
)
def test_bad_specs_name_the_spec(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_spec(text, KINDS, "source").number("settle", 0.3)
    assert needle in str(e.value) and text.split("?")[0][:5] in str(e.value)


def test_factories_validate(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        open_source(f"watch:{tmp_path}/missing")
    assert open_source(f"watch:{tmp_path}?settle=0").settle == 0.0
    with pytest.raises(ConfigError, match="expected mqtt://"):
        open_sink("mqtt:///prefix", "s1")
    with pytest.raises(ConfigError, match="must not contain"):
        open_sink("mqtt://127.0.0.1:1/a/#", "s1")
    with pytest.raises(ConfigError, match="webhook:http"):
        open_sink("webhook:ftp://x/y", "s1")
    sink = open_sink("mqtt://127.0.0.1:1884/plant/line1?buffer=7", "st1")
    assert sink.result_topic == "plant/line1/st1/result" and sink.capacity == 7


def test_station_imports_protocol_libraries_only_when_used() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import spade_edge.station.app, spade_edge.station.sinks, spade_edge.station.sources\n"
        "import spade_edge.station.sinks.mqtt, spade_edge.station.sinks.opcua\n"
        "import spade_edge.station.sources.camera, spade_edge.station.sources.genicam\n"
        "heavy = ('paho', 'asyncua', 'cv2', 'harvesters', 'torch', 'fastapi')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
