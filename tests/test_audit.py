"""The limits audit: limit-like constants need an entry, entries need a reader."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import protocol
import sidecar
from sidecar.audit import audit
from sidecar.limits import LimitSpec, load_inventory

PACKAGES = [Path(sidecar.__file__).parent, Path(protocol.__file__).parent]


@pytest.fixture
def tree(tmp_path) -> list[Path]:
    """A copy of the real packages, so tests can add code without touching the tree."""
    roots = []
    for package in PACKAGES:
        shutil.copytree(package, tmp_path / package.name, ignore=shutil.ignore_patterns("__pycache__"))
        roots.append(tmp_path / package.name)
    return roots


def spec(name: str, limit_class: str = "guest", default: int = 4) -> LimitSpec:
    env = None if limit_class == "invariant" else "SIDECAR_" + name.upper()
    return LimitSpec(name, limit_class, env, default, "count", "Why.")  # type: ignore[arg-type]


def test_a_new_limit_like_constant_is_named_with_file_and_line(tree):
    (tree[0] / "widgets.py").write_text('"""Widgets."""\n\nimport os\n\nMAX_WIDGETS = 64\n')
    offenders = audit(tree)
    assert any(
        offender.startswith("sidecar/widgets.py:5: MAX_WIDGETS") and "'max_widgets'" in offender
        for offender in offenders
    ), offenders


def test_a_runtime_recipe_shipped_in_the_package_is_not_daemon_code(tree):
    """An installed wheel holds the runtimes' build recipes under `sidecar/runtime_recipes`: programs
    of their own, whose constants bound no daemon work (CI audits the installed wheel)."""
    recipe = tree[0] / "runtime_recipes" / "python"
    recipe.mkdir(parents=True)
    (recipe / "build.py").write_text('"""A recipe."""\n\nSTACK_BYTES = 1 << 20\n')
    assert audit(tree) == []


def test_a_constant_without_a_reader_of_a_fake_entry_is_named(tree, tmp_path):
    inventory = (*load_inventory(), spec("vm_widgets"))
    offenders = audit(tree, inventory=inventory)
    assert any(offender.startswith("vm_widgets: inventory entry never read") for offender in offenders), offenders


def test_a_temp_inventory_file_drives_the_audit(tree, tmp_path):
    text = Path(PACKAGES[0].parent, "config", "limits.toml").read_text() + (
        '\n[[limit]]\nname = "vm_gadgets"\nclass = "guest"\nenv = "SIDECAR_VM_GADGETS"\ndefault = 1\n'
        'unit = "count"\nzero_means_off = false\nrationale = "Why."\n'
    )
    (tmp_path / "limits.toml").write_text(text)
    offenders = audit(tree, inventory=load_inventory(tmp_path / "limits.toml"))
    assert "vm_gadgets: inventory entry never read" in "\n".join(offenders)


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ("MAX_WIDGETS = 64", "MAX_WIDGETS"),
        ("WIDGETS_MAX = 64", "WIDGETS_MAX"),
        ("WIDGET_LIMIT = 64", "WIDGET_LIMIT"),
        ("WIDGET_BYTES = 64 * 1024", "WIDGET_BYTES"),
        ("WIDGET_TIMEOUT_MS = 5000", "WIDGET_TIMEOUT_MS"),
        ("TIMEOUT_S = 5.0", "TIMEOUT_S"),
        ("QUEUE_CAPACITY = 10", "QUEUE_CAPACITY"),
        ("DEFAULT_WIDGETS = 3", "DEFAULT_WIDGETS"),
        ("_MAX_RETRIES = 3", "_MAX_RETRIES"),
        ("MAX_WIDGETS: int = 64", "MAX_WIDGETS"),
        ("MAX_WIDGETS = int(os.environ.get('WIDGETS', '64'))", "MAX_WIDGETS"),
        ("class Pool:\n    MAX_SIZE = 8", "MAX_SIZE"),
        ("if True:\n    MAX_SIZE = 8", "MAX_SIZE"),
        ("def f():\n    MAX_SIZE = 8\n    return MAX_SIZE", None),
        ("DEFAULT_MODE = 'stateful'", None),
        ("DEFAULT_ON = True", None),
        ("DEFAULT_HANDLER = None", None),
        ("STATUS_TIMEOUT = -2", None),
        ("VALTYPE_BYTES = frozenset({1, 2})", None),
        ("max_widgets = 64", None),
        ("MAX_WIDGETS: int", None),
        ("PROTOCOL_FRAME_BYTES = 1 << 24", None),
    ],
)
def test_which_constants_look_like_limits(tmp_path, source, flagged):
    root = tmp_path / "sidecar"
    root.mkdir()
    (root / "mod.py").write_text("import os\n" + source + "\n")
    constants = [o for o in audit([root], inventory=load_inventory()) if o.startswith("sidecar/mod.py")]
    if flagged is None:
        assert constants == []
    else:
        [offender] = constants
        assert f": {flagged} looks like a limit" in offender


def test_reads_count_as_attributes_or_strings_outside_the_limits_modules(tmp_path):
    root = tmp_path / "sidecar"
    root.mkdir()
    (root / "a.py").write_text("def f(limits):\n    return limits.vm_alpha\n")
    (root / "b.py").write_text("def g(limits):\n    limits.exceeded('vm_beta', 1)\n")
    (root / "limits.py").write_text("x = 'vm_gamma'\n")
    (root / "audit.py").write_text("x = 'vm_gamma'\n")
    (root / "limits_cli.py").write_text("x = 'vm_gamma'\n")
    (root / "c.py").write_text("# vm_gamma in a comment is not a read\n'''vm_gamma in prose is not either'''\n")
    offenders = audit([root], inventory=[spec("vm_alpha"), spec("vm_beta"), spec("vm_gamma")])
    assert [o.split(":")[0] for o in offenders] == ["vm_gamma"]


def test_an_invariant_constant_is_a_read_and_must_match_the_inventory(tmp_path):
    root = tmp_path / "protocol"
    root.mkdir()
    (root / "wasm.py").write_text("WASM_PAGE_BYTES = 64 * 1024\nTIMER_MAX_MS = 2**31\n")
    inventory = [spec("wasm_page_bytes", "invariant", 65536), spec("timer_max_ms", "invariant", 2**31 - 1)]
    assert audit([root], inventory=inventory) == [
        "protocol/wasm.py:2: TIMER_MAX_MS = 2147483648 but the inventory says timer_max_ms = 2147483647"
    ]


def test_a_tunable_constant_is_not_a_read(tmp_path):
    """Code must read a tunable limit through `Limits`, or its variable would have no effect."""
    root = tmp_path / "sidecar"
    root.mkdir()
    (root / "vm.py").write_text("VM_WIDGETS = 4\n")
    assert audit([root], inventory=[spec("vm_widgets")]) == [
        "vm_widgets: inventory entry never read by the code (no `.vm_widgets` or 'vm_widgets' outside the "
        "limits modules)"
    ]


def test_a_tree_that_reads_everything_is_clean(tmp_path):
    root = tmp_path / "sidecar"
    root.mkdir()
    inventory = load_inventory()
    uses = "".join(f"def use_{s.name}(limits):\n    return limits.{s.name}\n" for s in inventory)
    (root / "uses.py").write_text(uses)
    assert audit([root], inventory=inventory) == []


def test_unparsable_files_are_reported_not_fatal(tmp_path):
    root = tmp_path / "sidecar"
    root.mkdir()
    (root / "broken.py").write_text("def (:\n")
    [offender] = audit([root], inventory=[])
    assert offender.startswith("sidecar/broken.py: cannot be parsed")


def test_live_tree_audit_clean():
    offenders = audit()
    assert offenders == [], "\n".join(offenders)
