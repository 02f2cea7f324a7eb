"""NVLink topology from NVML: simulated machines through a fake ``pynvml``, and what ``hal info`` gets."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from hal_nvidia.probe import NvidiaFacts, NvLink, decide, gather, nvlink_peers, nvlink_summary

H100 = "NVIDIA H100 80GB HBM3"
NVSWITCH, GPU = 2, 0  # nvmlDeviceGetNvLinkRemoteDeviceType's answers


class NVMLError_NotSupported(Exception):
    value = 3


class NVMLError_InvalidArgument(Exception):
    value = 2


class NVMLError_GpuIsLost(Exception):
    value = 15


def gpu_bus(i: int) -> str:
    """NVML's v3 bus id (8 domain digits, upper case) of simulated GPU ``i``."""
    return f"00000000:{0x18 + 0x10 * i:02X}:00.0"


def switch_bus(s: int) -> str:
    return f"00000000:{0xC0 + s:02X}:00.0"


def _install(
    monkeypatch: pytest.MonkeyPatch,
    n: int,
    state: Callable[[int, int], int],
    far_end: Callable[[int, int], str],
    remote_type: Callable[[int, int], int] | None = None,
    *,
    bus_id: Callable[[int], Any] = gpu_bus,
    remote_pci: Callable[[int, int], Any] | None = None,
) -> types.ModuleType:
    """A fake ``pynvml`` with ``n`` H100s; ``state(gpu, link)`` answers nvmlDeviceGetNvLinkState (or
    raises), ``far_end(gpu, link)`` is the bus id at the link's far end."""
    module = types.ModuleType("pynvml")
    module.__spec__ = importlib.machinery.ModuleSpec("pynvml", None)
    functions: dict[str, Any] = {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlSystemGetDriverVersion": lambda: "570.86.15",
        "nvmlSystemGetCudaDriverVersion": lambda: 12080,
        "nvmlDeviceGetCount": lambda: n,
        "nvmlDeviceGetHandleByIndex": lambda i: ("handle", i),
        "nvmlDeviceGetName": lambda h: H100,
        "nvmlDeviceGetCudaComputeCapability": lambda h: (9, 0),
        "nvmlDeviceGetPciInfo": lambda h: SimpleNamespace(busId=bus_id(h[1])),
        "nvmlDeviceGetNvLinkState": lambda h, link: state(h[1], link),
        "nvmlDeviceGetNvLinkRemotePciInfo": remote_pci
        or (lambda h, link: SimpleNamespace(busId=far_end(h[1], link).encode())),  # older pynvml: bytes
        "NVML_NVLINK_MAX_LINKS": 18,
        "NVML_FEATURE_ENABLED": 1,
    }
    if remote_type is not None:
        functions["nvmlDeviceGetNvLinkRemoteDeviceType"] = lambda h, link: remote_type(h[1], link)
    for name, value in functions.items():
        setattr(module, name, value)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return module


def _on_cuda_torch(facts: NvidiaFacts) -> NvidiaFacts:
    return replace(facts, torch_cuda="12.8", torch_hip=None)


def _up(gpu: int, link: int) -> int:
    return 1


# ---------------------------------------------------------------------------------------------------
# Simulated machines
# ---------------------------------------------------------------------------------------------------


def test_hgx_h100_eight_gpus_all_to_all_through_nvswitch(monkeypatch: pytest.MonkeyPatch) -> None:
    # HGX H100: each GPU's 18 links go to the four NVSwitches (5+4+4+5), none directly to a GPU.
    _install(monkeypatch, 8, _up, lambda g, link: switch_bus(link % 4), lambda g, link: NVSWITCH)
    facts = gather()
    nvlinks = facts.nvml.nvlinks if facts.nvml else None
    assert nvlinks is not None and [len(links) for links in nvlinks] == [18] * 8
    assert all(link.remote == "nvswitch" and link.peer is None for links in nvlinks for link in links)
    assert nvlinks[0][5] == NvLink(5, "nvswitch", None, "0000:c1:00.0")
    assert nvlink_peers(nvlinks) == tuple(tuple(j for j in range(8) if j != i) for i in range(8))

    a = decide(_on_cuda_torch(facts))
    assert a.available
    assert a.details["nvlink"] == "all 8 GPUs connected, 18 links each, through NVSwitch"
    assert a.details["nvlink_links"] == [18] * 8
    assert a.details["nvlink_peers"][3] == [0, 1, 2, 4, 5, 6, 7]
    json.dumps(dict(a.details))  # hal info --json prints the details as they are


@pytest.mark.parametrize("with_remote_type", [True, False], ids=["remote-type", "bus-id-only"])
def test_eight_gpus_fully_meshed_by_direct_links(monkeypatch: pytest.MonkeyPatch, with_remote_type: bool) -> None:
    # 18 direct links per GPU spread over its 7 peers; without nvmlDeviceGetNvLinkRemoteDeviceType
    # (older pynvml) the far end's bus id alone identifies the local GPU.
    _install(
        monkeypatch,
        8,
        _up,
        lambda g, link: gpu_bus((g + 1 + link % 7) % 8),
        (lambda g, link: GPU) if with_remote_type else None,
    )
    facts = gather()
    assert facts.nvml is not None and facts.nvml.nvlinks is not None
    gpu0 = facts.nvml.nvlinks[0]
    assert [link.peer for link in gpu0[:8]] == [1, 2, 3, 4, 5, 6, 7, 1]
    assert {link.remote for links in facts.nvml.nvlinks for link in links} == {"gpu"}
    a = decide(_on_cuda_torch(facts))
    assert a.details["nvlink"] == "all 8 GPUs connected, 18 links each"
    assert a.details["nvlink_peers"][0] == [1, 2, 3, 4, 5, 6, 7]


def test_pcie_only_gpus_answer_not_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    # What NVML says for every link of a GPU without NVLink (PCIe cards without a bridge).
    def state(gpu: int, link: int) -> int:
        raise NVMLError_NotSupported("Not Supported")

    _install(monkeypatch, 4, state, lambda g, link: "")
    facts = gather()
    assert facts.nvml is not None and facts.nvml.nvlinks == ((),) * 4
    assert not any("NVLink" in note for note in facts.notes)
    a = decide(_on_cuda_torch(facts))
    assert a.available
    assert a.details["nvlink"] == "none: no active NVLink (GPUs talk over PCIe)"
    assert "nvlink_links" not in a.details and "nvlink_peers" not in a.details


def test_links_reported_but_disabled_count_as_none(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, 2, lambda g, link: 0, lambda g, link: gpu_bus(1 - g))
    facts = gather()
    assert facts.nvml is not None and facts.nvml.nvlinks == ((), ())
    assert decide(_on_cuda_torch(facts)).details["nvlink"].startswith("none")


def test_links_past_the_gpus_count_answer_invalid_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    # An A100 has 12 links; NVML_NVLINK_MAX_LINKS is 18: links 12-17 are InvalidArgument.
    def state(gpu: int, link: int) -> int:
        if link >= 12:
            raise NVMLError_InvalidArgument("Invalid Argument")
        return 1

    _install(monkeypatch, 2, state, lambda g, link: gpu_bus(1 - g), lambda g, link: GPU)
    facts = gather()
    a = decide(_on_cuda_torch(facts))
    assert a.details["nvlink"] == "all 2 GPUs connected, 12 links each"
    assert a.details["nvlink_links"] == [12, 12]
    assert a.details["nvlink_peers"] == [[1], [0]]


def test_pairs_of_gpus_are_a_partial_topology(monkeypatch: pytest.MonkeyPatch) -> None:
    # H100 NVL style: GPUs bridged in pairs (0-1, 2-3), 4 links each, pairs reach each other over PCIe.
    def state(gpu: int, link: int) -> int:
        if link >= 4:
            raise NVMLError_NotSupported("Not Supported")
        return 1

    _install(monkeypatch, 4, state, lambda g, link: gpu_bus(g ^ 1), lambda g, link: GPU)
    a = decide(_on_cuda_torch(gather()))
    assert a.details["nvlink"] == "partial: 4 of 4 GPUs have NVLink peers (4 links each); linked pairs 0-1, 2-3"
    assert a.details["nvlink_peers"] == [[1], [0], [3], [2]]


def test_an_unexpected_nvlink_error_leaves_the_topology_unknown_not_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def state(gpu: int, link: int) -> int:
        raise NVMLError_GpuIsLost("GPU is lost")

    _install(monkeypatch, 2, state, lambda g, link: "")
    facts = gather()
    assert facts.nvml is not None and facts.nvml.nvlinks is None
    assert any("NVLink topology: NVMLError_GpuIsLost: GPU is lost" in note for note in facts.notes)
    a = decide(_on_cuda_torch(facts))
    assert a.available
    assert a.details["nvlink"] == "unknown (see notes)"


def test_a_pynvml_without_nvlink_functions_leaves_the_topology_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _install(monkeypatch, 1, _up, lambda g, link: "")
    del fake.nvmlDeviceGetNvLinkState
    facts = gather()
    assert facts.nvml is not None and facts.nvml.nvlinks is None
    assert any("NVLink topology: AttributeError" in note for note in facts.notes)


def test_a_far_end_nvml_cannot_describe_is_unknown_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    def remote_pci(handle: Any, link: int) -> Any:
        if link == 0:
            raise NVMLError_NotSupported("Not Supported")
        return SimpleNamespace(busId=gpu_bus(1 - handle[1]))

    def state(gpu: int, link: int) -> int:
        if link >= 2:
            raise NVMLError_NotSupported("Not Supported")
        return 1

    _install(monkeypatch, 2, state, lambda g, link: "", remote_pci=remote_pci)
    facts = gather()
    assert facts.nvml is not None and facts.nvml.nvlinks is not None
    assert facts.nvml.nvlinks[0] == (NvLink(0, "unknown", None, ""), NvLink(1, "gpu", 1, "0000:28:00.0"))
    assert any("far end of GPU 0's NVLink 0" in note for note in facts.notes)
    assert nvlink_peers(facts.nvml.nvlinks) == ((1,), (0,))


@pytest.mark.parametrize(
    "bus",
    ["00000000:18:00.0", "0000:18:00.0", b"0000:18:00.0\x00", "00000000:18:00.0 "],
    ids=["v3", "legacy", "bytes", "padded"],
)
def test_bus_ids_match_whatever_form_nvml_gives(monkeypatch: pytest.MonkeyPatch, bus: Any) -> None:
    # The local GPU's id in one spelling, the far end's in NVML's v3 spelling: they must still match.
    _install(
        monkeypatch,
        2,
        lambda g, link: 1 if link == 0 else 0,
        lambda g, link: gpu_bus(1 - g),
        bus_id=lambda i: bus if i == 0 else gpu_bus(1),
    )
    facts = gather()
    assert facts.nvml is not None and facts.nvml.nvlinks is not None
    assert facts.nvml.nvlinks[1] == (NvLink(0, "gpu", 0, "0000:18:00.0"),)


def test_bus_id_falls_back_to_the_numeric_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(
        monkeypatch,
        2,
        lambda g, link: 1 if link == 0 else 0,
        lambda g, link: gpu_bus(1 - g),
        bus_id=lambda i: "",
        remote_pci=lambda h, link: SimpleNamespace(domain=0, bus=0x18 + 0x10 * (1 - h[1]), device=0),
    )
    facts = gather()
    assert facts.nvml is not None and facts.nvml.nvlinks is not None
    # The far end's id comes from the numeric fields; the local GPUs' ids are unreadable here, so it
    # matches none of them and stays "unknown".
    assert facts.nvml.nvlinks[0] == (NvLink(0, "unknown", None, "0000:28:00.0"),)


# ---------------------------------------------------------------------------------------------------
# The pure functions
# ---------------------------------------------------------------------------------------------------


def test_summary_of_one_gpu_and_of_an_unknown_topology() -> None:
    assert nvlink_summary(None) == "unknown (see notes)"
    one = ((NvLink(0, "nvswitch"), NvLink(1, "nvswitch")),)
    assert nvlink_summary(one) == "2 links active, through NVSwitch; no other GPU here"
    assert nvlink_summary(((NvLink(0, "nvswitch"),),)) == "1 link active, through NVSwitch; no other GPU here"


def test_switch_attached_gpus_reach_each_other_but_not_a_pcie_gpu() -> None:
    switched = tuple(NvLink(link, "nvswitch") for link in range(18))
    nvlinks = (switched, switched, ())
    assert nvlink_peers(nvlinks) == ((1,), (0,), ())
    assert nvlink_summary(nvlinks) == (
        "partial: 2 of 3 GPUs have NVLink peers (18 links each, through NVSwitch); linked pairs 0-1"
    )
    mixed = ((NvLink(0, "gpu", 1), NvLink(1, "gpu", 1)), (NvLink(0, "gpu", 0),), (), ())
    assert nvlink_summary(mixed) == "partial: 2 of 4 GPUs have NVLink peers (1-2 links per GPU); linked pairs 0-1"
    assert nvlink_summary(((NvLink(0, "unknown"),), ())) == "1 active link, none to a GPU identified here"
