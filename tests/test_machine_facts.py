"""benchmarks/machine_facts.py: the facts a benchmark records to explain its bandwidths."""

from __future__ import annotations

import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def machine_facts(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # it imports its sibling run_context
    return importlib.import_module("machine_facts")


@pytest.mark.parametrize(("text", "mode"), [
    ("always [madvise] never\n", "madvise"),
    ("[always] madvise never\n", "always"),
    ("always madvise [never]\n", "never"),
    ("no brackets\n", None),
])
def test_transparent_hugepage_mode_is_the_bracketed_word(machine_facts, tmp_path, text, mode):
    enabled = tmp_path / "enabled"
    enabled.write_text(text)
    assert machine_facts.transparent_hugepages(enabled)["mode"] == mode


def test_transparent_hugepages_without_the_file_or_with_torchs_switch(machine_facts, tmp_path, monkeypatch):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert machine_facts.transparent_hugepages(tmp_path / "missing") == {
        "mode": None, "torch_thp_mem_alloc_enable": None}
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    assert machine_facts.transparent_hugepages(tmp_path / "missing")["torch_thp_mem_alloc_enable"] == "1"


def test_cpu_model_names_the_family_and_model_numbers(machine_facts, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                       "model name\t: AMD EPYC\nstepping\t: 1\n\nprocessor\t: 1\ncpu family\t: 25\n")
    assert machine_facts.cpu_model(cpuinfo) == "AMD EPYC (family 26, model 2, stepping 1)"


def test_cpu_model_without_x86_numbers_or_the_file(machine_facts, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\n")
    assert machine_facts.cpu_model(cpuinfo) == "Some CPU"
    assert machine_facts.cpu_model(tmp_path / "missing")  # platform's words, never empty
