"""``--require-attestation``: the policy logic and every refusal, with a fake verifier.

No confidential-computing hardware is here: the claims below are what a verifier would
return for real evidence. ``NvidiaVerifier`` runs against a stand-in for
``nv_attestation_sdk`` that records how it is called (the real SDK needs a CC-mode GPU
and NVIDIA's service).
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

import smsd.extras
from smsd.errors import SmsdError
from smsd.extras import MissingExtraError
from smsd.sealing.attestation import (
    CLOCK_SKEW_S,
    EVIDENCE_FORMAT,
    POLICY_FORMAT,
    AttestationError,
    AttestationReport,
    NvidiaVerifier,
    check_claims,
    expected_report_data,
    load_evidence,
    load_policy,
    public_key_fingerprint,
    require_attestation,
)

PUBLIC = hashlib.sha256(b"the server's X25519 public key").digest()  # any 32 bytes
OTHER = hashlib.sha256(b"somebody else's key").digest()
FP = hashlib.sha256(PUBLIC).hexdigest()
MEASUREMENT = "ab" * 48
CREATED = "2026-12-01T12:00:00Z"
CREATED_UNIX = datetime(2026, 12, 1, 12, tzinfo=timezone.utc).timestamp()
NOW = CREATED_UNIX + 60
GPU_EVIDENCE = {"evidence_list": [{"arch": "HOPPER", "certificate": "Y2VydA==",
                                   "evidence": "cmVwb3J0"}]}


def policy_dict(**changes: Any) -> dict[str, Any]:
    policy = {
        "format": POLICY_FORMAT, "version": 1,
        "cpu_tee": ["sev-snp"],
        "measurements": [MEASUREMENT],
        "forbid_debug": True,
        "gpu": {"cc_mode_on": True, "min_count": 1, "driver_versions": ["570.133.20"],
                "vbios_versions": ["96.00.CF.00.02"]},
        "max_evidence_age_s": 3600,
    }
    policy.update(changes)
    return policy


def write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj))
    return path


def evidence_dict(**changes: Any) -> dict[str, Any]:
    evidence = {"format": EVIDENCE_FORMAT, "version": 1, "public_key_sha256": FP,
                "created": CREATED, "cpu": {"tee": "sev-snp", "report": "cmVwb3J0"},
                "gpu": GPU_EVIDENCE}
    evidence.update(changes)
    return evidence


def good_claims(fingerprint: str = FP, created: str = CREATED,
                gpu: Any = GPU_EVIDENCE) -> dict[str, Any]:
    """What a verifier returns for genuine evidence of a CVM that meets the policy."""
    return {
        "cpu": {"tee": "sev-snp", "measurement": MEASUREMENT, "debug": False,
                "report_data": expected_report_data(fingerprint, created, gpu)},
        "gpus": [{"name": "GPU-0", "nonce": fingerprint, "cc_mode": "on", "debug": False,
                  "measurements_match": True, "driver_version": "570.133.20",
                  "vbios_version": "96.00.CF.00.02"}],
    }


class FakeVerifier:
    def __init__(self, claims: dict[str, Any] | None = None) -> None:
        self.claims = good_claims() if claims is None else claims
        self.calls: list[Any] = []

    def verify(self, evidence):
        self.calls.append(evidence)
        return self.claims


@pytest.fixture
def files(tmp_path):
    return (write_json(tmp_path / "policy.json", policy_dict()),
            write_json(tmp_path / "server.evidence.json", evidence_dict()))


def refused(excinfo, *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message  # one line
    for needle in needles:
        assert needle in message, message
    return message


def check(claims: dict[str, Any], tmp_path: Path, *, policy: dict[str, Any] | None = None,
          now: float = NOW, fingerprint: str = FP) -> AttestationReport:
    policy_path = write_json(tmp_path / "p.json", policy or policy_dict())
    evidence = load_evidence(write_json(tmp_path / "e.json", evidence_dict()))
    return check_claims(load_policy(policy_path), claims, fingerprint, now, evidence=evidence)


# ---------------------------------------------------------------- accepting
def test_accepts_evidence_that_meets_the_policy(files):
    policy, evidence = files
    verifier = FakeVerifier()
    report = require_attestation(PUBLIC, policy, evidence, verifier=verifier, now=NOW)
    assert len(verifier.calls) == 1 and verifier.calls[0].public_key_sha256 == FP
    assert report.fingerprint == FP and report.cpu_tee == "sev-snp"
    assert report.measurement == MEASUREMENT and report.age_s == pytest.approx(60)
    assert (report.gpus, report.driver_versions, report.vbios_versions) == \
        (1, ("570.133.20",), ("96.00.CF.00.02",))
    assert report.checks == ("cpu tee", "key binding", "bundle binding", "freshness",
                             "measurement", "cpu debug off", "gpu key binding",
                             "gpu measurements", "gpu cc mode", "gpu debug off", "gpu driver",
                             "gpu vbios")
    assert report.policy == str(policy) and report.evidence == str(evidence)
    assert str(evidence) in report.summary() and FP[:16] in report.summary()


def test_fingerprint_is_sha256_of_the_raw_key():
    assert public_key_fingerprint(PUBLIC) == hashlib.sha256(PUBLIC).hexdigest()
    assert public_key_fingerprint(PUBLIC) != public_key_fingerprint(OTHER)
    with pytest.raises(ValueError, match="32 raw bytes"):
        public_key_fingerprint(PUBLIC[:31])


def test_report_data_binds_key_time_and_gpu_evidence():
    base = expected_report_data(FP, CREATED, GPU_EVIDENCE)
    assert len(bytes.fromhex(base)) == 64 and base[:64] == FP
    assert expected_report_data(FP, "2026-12-01T12:00:01Z", GPU_EVIDENCE) != base
    assert expected_report_data(FP, CREATED, {"evidence_list": []}) != base
    assert expected_report_data(FP, CREATED, dict(reversed(GPU_EVIDENCE.items()))) == base


def test_measurements_compare_case_insensitively(tmp_path):
    report = check(good_claims(), tmp_path,
                   policy=policy_dict(measurements=[MEASUREMENT.upper()]))
    assert report.measurement == MEASUREMENT


def test_a_cpu_only_policy_ignores_gpus(tmp_path):
    claims = good_claims()
    claims["gpus"] = []
    report = check(claims, tmp_path, policy=policy_dict(gpu=None))
    assert report.gpus == 0 and not any(c.startswith("gpu") for c in report.checks)
    assert "no GPU" in report.summary()


def test_freshness_accepts_the_limit_and_small_clock_skew(tmp_path):
    assert check(good_claims(), tmp_path, now=CREATED_UNIX + 3600).age_s == 3600
    assert check(good_claims(), tmp_path, now=CREATED_UNIX - CLOCK_SKEW_S).age_s == 0


# ---------------------------------------------------------------- refusing: claims
def test_evidence_for_another_key_is_refused_before_verifying(files):
    policy, evidence = files
    verifier = FakeVerifier()
    with pytest.raises(AttestationError) as excinfo:
        require_attestation(OTHER, policy, evidence, verifier=verifier, now=NOW)
    refused(excinfo, str(evidence), "(key binding)", FP[:16])
    assert verifier.calls == []


def test_cpu_report_bound_to_another_key_is_refused(files):
    policy, evidence = files
    other_fp = hashlib.sha256(OTHER).hexdigest()
    verifier = FakeVerifier(good_claims(fingerprint=other_fp))
    with pytest.raises(AttestationError) as excinfo:
        require_attestation(PUBLIC, policy, evidence, verifier=verifier, now=NOW)
    refused(excinfo, str(evidence), "(key binding)", "CPU report", other_fp[:16])


def test_gpu_nonce_of_another_key_is_refused(tmp_path):
    claims = good_claims()
    claims["gpus"][0]["nonce"] = hashlib.sha256(OTHER).hexdigest()
    with pytest.raises(AttestationError) as excinfo:
        check(claims, tmp_path)
    refused(excinfo, "(key binding)", "GPU-0's evidence nonce")


@pytest.mark.parametrize("what", ["created", "gpu"])
def test_bundle_edited_after_the_report_was_signed_is_refused(tmp_path, what):
    # report_data signed over the original bundle; the file's time or GPU evidence replaced
    claims = good_claims()
    changes = {"created": "2026-12-01T12:30:00Z"} if what == "created" else \
        {"gpu": {"evidence_list": [{"arch": "HOPPER", "evidence": "b3RoZXI="}]}}
    evidence = load_evidence(write_json(tmp_path / "e.json", evidence_dict(**changes)))
    policy = load_policy(write_json(tmp_path / "p.json", policy_dict()))
    with pytest.raises(AttestationError) as excinfo:
        check_claims(policy, claims, FP, NOW, evidence=evidence)
    refused(excinfo, str(tmp_path / "e.json"), "(bundle binding)")


def test_stale_evidence_is_refused(tmp_path):
    with pytest.raises(AttestationError) as excinfo:
        check(good_claims(), tmp_path, now=CREATED_UNIX + 3601)
    refused(excinfo, "(freshness)", "3601 s old", "allows 3600 s")


def test_evidence_from_the_future_is_refused(tmp_path):
    with pytest.raises(AttestationError) as excinfo:
        check(good_claims(), tmp_path, now=CREATED_UNIX - CLOCK_SKEW_S - 10)
    refused(excinfo, "(freshness)", "in the future")


def test_cpu_debug_is_refused_unless_the_policy_allows_it(tmp_path):
    claims = good_claims()
    claims["cpu"]["debug"] = True
    with pytest.raises(AttestationError) as excinfo:
        check(claims, tmp_path)
    refused(excinfo, "(cpu debug)")
    report = check(claims, tmp_path, policy=policy_dict(forbid_debug=False))
    assert "cpu debug off" not in report.checks


def test_gpu_debug_is_refused(tmp_path):
    claims = good_claims()
    claims["gpus"][0]["debug"] = True
    with pytest.raises(AttestationError) as excinfo:
        check(claims, tmp_path)
    refused(excinfo, "(gpu debug)", "GPU-0")


def test_unknown_measurement_is_refused(tmp_path):
    claims = good_claims()
    claims["cpu"]["measurement"] = "cd" * 48
    with pytest.raises(AttestationError) as excinfo:
        check(claims, tmp_path)
    refused(excinfo, "(measurement)", "cdcdcdcd", "allow-list")


def test_cpu_tee_the_policy_does_not_allow_is_refused(tmp_path):
    claims = good_claims()
    claims["cpu"]["tee"] = "tdx"
    with pytest.raises(AttestationError) as excinfo:
        check(claims, tmp_path)
    refused(excinfo, "(cpu tee)", "'tdx'", "sev-snp")


@pytest.mark.parametrize("mode", ["off", "devtools", None])
def test_gpu_not_in_cc_mode_is_refused(tmp_path, mode):
    claims = good_claims()
    claims["gpus"][0]["cc_mode"] = mode
    with pytest.raises(AttestationError) as excinfo:
        check(claims, tmp_path)
    refused(excinfo, "(gpu cc mode)", mode or "not established")
    relaxed = policy_dict(gpu={**policy_dict()["gpu"], "cc_mode_on": False})
    assert "gpu cc mode" not in check(claims, tmp_path, policy=relaxed).checks


@pytest.mark.parametrize(("key", "value", "check_name"), [
    ("driver_version", "535.86.10", "(gpu driver)"),
    ("vbios_version", "96.00.5E.00.01", "(gpu vbios)"),
    ("measurements_match", False, "(gpu measurements)"),
])
def test_gpu_claims_outside_the_policy_are_refused(tmp_path, key, value, check_name):
    claims = good_claims()
    claims["gpus"][0][key] = value
    with pytest.raises(AttestationError) as excinfo:
        check(claims, tmp_path)
    refused(excinfo, check_name, "GPU-0")


def test_any_gpu_version_when_the_policy_lists_none(tmp_path):
    claims = good_claims()
    claims["gpus"][0]["driver_version"] = "999.0"
    gpu = {"cc_mode_on": True, "driver_versions": None}
    report = check(claims, tmp_path, policy=policy_dict(gpu=gpu))
    assert report.driver_versions == ("999.0",) and "gpu driver" not in report.checks


def test_too_few_gpus_are_refused(tmp_path):
    with pytest.raises(AttestationError) as excinfo:
        check(good_claims(), tmp_path,
              policy=policy_dict(gpu={**policy_dict()["gpu"], "min_count": 2}))
    refused(excinfo, "(gpu count)", "1 verified GPU(s)", "at least 2")


@pytest.mark.parametrize("path", [("cpu", "measurement"), ("cpu", "debug"),
                                  ("cpu", "report_data"), ("gpus", 0, "nonce")])
def test_claims_missing_a_field_are_refused(tmp_path, path):
    claims = good_claims()
    target = claims
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    with pytest.raises(AttestationError) as excinfo:
        check(claims, tmp_path)
    refused(excinfo, "(claims)", "lack", path[-1])


def test_debug_claim_must_be_a_real_boolean(tmp_path):
    claims = good_claims()
    claims["cpu"]["debug"] = 0  # falsy, but not a verified "debug: false"
    with pytest.raises(AttestationError) as excinfo:
        check(claims, tmp_path)
    refused(excinfo, "(claims)", "cpu.debug")


def test_verifier_refusal_propagates(files):
    class Refusing:
        def verify(self, evidence):
            raise AttestationError(f"{evidence.path}: attestation refused (cpu report): bad")

    with pytest.raises(AttestationError, match=r"\(cpu report\): bad"):
        require_attestation(PUBLIC, *files, verifier=Refusing(), now=NOW)


# ---------------------------------------------------------------- refusing: files
def _policy_error(tmp_path, content: str | bytes | None) -> str:
    path = tmp_path / "policy.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(AttestationError) as excinfo:
        load_policy(path)
    assert issubclass(excinfo.type, SmsdError) and issubclass(excinfo.type, ValueError)
    return refused(excinfo, f"attestation policy {path}: ")


@pytest.mark.parametrize(("content", "needle"), [
    (None, "does not exist"),
    ("{not json", "not valid JSON (line 1"),
    ("[1, 2]", "not a JSON object"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
    (json.dumps(policy_dict(format="smsd-attestation-evidence")), "format is"),
    (json.dumps(policy_dict(version=2)), "version is 2"),
    (json.dumps(policy_dict(version=True)), "version is True"),
    (json.dumps(policy_dict(allow_everything=True)), "unknown key allow_everything"),
    (json.dumps(policy_dict(gpu={"cc_mode": "on"})), "unknown key cc_mode in gpu"),
    (json.dumps({k: v for k, v in policy_dict().items() if k != "measurements"}),
     "missing key measurements"),
    (json.dumps({k: v for k, v in policy_dict().items() if k != "gpu"}), "missing key gpu"),
    (json.dumps(policy_dict(cpu_tee=["sgx"])), "cpu_tee 'sgx'"),
    (json.dumps(policy_dict(cpu_tee=[])), "cpu_tee must be a non-empty list"),
    (json.dumps(policy_dict(measurements=[])), "measurements must be a non-empty list"),
    (json.dumps(policy_dict(measurements=["zz" * 48])), "is not 96 hex digits (sev-snp)"),
    (json.dumps(policy_dict(measurements=["ab" * 32])), "is not 96 hex digits"),
    (json.dumps(policy_dict(max_evidence_age_s=0)), "max_evidence_age_s must be"),
    (json.dumps(policy_dict(max_evidence_age_s="3600")), "max_evidence_age_s must be"),
    (json.dumps(policy_dict(max_evidence_age_s=True)), "max_evidence_age_s must be"),
    (json.dumps(policy_dict(forbid_debug="yes")), "forbid_debug must be true or false"),
    (json.dumps(policy_dict(gpu=[])), "gpu must be an object or null"),
    (json.dumps(policy_dict(gpu={"min_count": 0})), "gpu.min_count must be"),
    (json.dumps(policy_dict(gpu={"cc_mode_on": 1})), "gpu.cc_mode_on must be"),
    (json.dumps(policy_dict(gpu={"driver_versions": []})), "gpu.driver_versions must be"),
    ('{"format": "smsd-attestation-policy", "format": "x"}', "'format' appears twice"),
    (json.dumps(policy_dict()).replace("3600", "NaN"), "NaN is not a JSON number"),
])
def test_bad_policy_files_are_refused(tmp_path, content, needle):
    assert needle in _policy_error(tmp_path, content)


def test_policy_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / "policy.json").mkdir()
    assert "is a folder" in _policy_error(tmp_path, None)


def test_good_policy_loads_with_defaults(tmp_path):
    policy = policy_dict(cpu_tee=["sev-snp", "tdx"], measurements=[MEASUREMENT, "0f" * 192],
                         gpu={})
    del policy["forbid_debug"]
    loaded = load_policy(write_json(tmp_path / "policy.json", policy))
    assert loaded.cpu_tee == ("sev-snp", "tdx") and loaded.forbid_debug is True
    assert loaded.gpu is not None and loaded.gpu.cc_mode_on and loaded.gpu.min_count == 1
    assert loaded.gpu.driver_versions is None and loaded.max_evidence_age_s == 3600.0
    with pytest.raises(AttributeError):
        loaded.forbid_debug = False  # frozen


@pytest.mark.parametrize(("changes", "needle"), [
    ({"format": "smsd-attestation-policy"}, "format is"),
    ({"extra": 1}, "unknown key extra"),
    ({"public_key_sha256": "AB" * 32}, "public_key_sha256 must be 64 lower-case hex"),
    ({"public_key_sha256": FP[:-2]}, "public_key_sha256 must be 64"),
    ({"created": "2026-12-01T12:00:00"}, "created must be an ISO 8601 UTC time"),
    ({"created": "yesterday Z"}, "created must be"),
    ({"created": 1796126400}, "created must be"),
    ({"cpu": {}}, "cpu must be a non-empty object"),
    ({"cpu": "cmVwb3J0"}, "cpu must be a non-empty object"),
    ({"gpu": [1]}, "gpu must be a non-empty object"),
])
def test_malformed_evidence_is_refused(tmp_path, changes, needle):
    path = write_json(tmp_path / "server.evidence.json", evidence_dict(**changes))
    with pytest.raises(AttestationError) as excinfo:
        load_evidence(path)
    refused(excinfo, f"attestation evidence {path}: ", needle)


@pytest.mark.parametrize(("content", "needle"), [
    (None, "does not exist"), ("", "not valid JSON"), ('"evidence"', "not a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_unreadable_evidence_is_refused(tmp_path, content, needle):
    path = tmp_path / "server.evidence.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(AttestationError) as excinfo:
        require_attestation(PUBLIC, write_json(tmp_path / "p.json", policy_dict()), path,
                            verifier=FakeVerifier(), now=NOW)
    refused(excinfo, f"attestation evidence {path}: ", needle)


def test_missing_key_in_evidence_is_refused(tmp_path):
    evidence = evidence_dict()
    del evidence["gpu"]  # null is allowed, absent is not
    with pytest.raises(AttestationError) as excinfo:
        load_evidence(write_json(tmp_path / "e.json", evidence))
    refused(excinfo, "missing key gpu")
    assert load_evidence(write_json(tmp_path / "e.json", evidence_dict(gpu=None))).gpu is None


# ---------------------------------------------------------------- the real verifier
def test_missing_sdk_raises_missing_extra_before_any_work(tmp_path, monkeypatch):
    real = smsd.extras.available
    monkeypatch.setattr(smsd.extras, "available",
                        lambda module: module != "nv_attestation_sdk" and real(module))
    with pytest.raises(MissingExtraError) as excinfo:  # the files do not even exist
        require_attestation(PUBLIC, tmp_path / "nope.json", tmp_path / "nope.evidence.json")
    assert "--require-attestation" in str(excinfo.value)
    assert "pip install 'smsd[attestation]'" in str(excinfo.value)
    status = smsd.extras.extra_statuses()["attestation"]
    assert not status.installed and "nv_attestation_sdk" in status.detail


def test_sdk_present_gets_past_the_extra_check(files, monkeypatch):
    monkeypatch.setattr(smsd.extras, "available", lambda module: True)
    with pytest.raises(AttestationError) as excinfo:  # ... and then refuses the CPU report
        require_attestation(PUBLIC, *files, now=NOW)
    refused(excinfo, "(cpu report)")


def test_nvidia_verifier_refuses_cpu_evidence_it_cannot_verify(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "nv_attestation_sdk", None)  # never reached
    with pytest.raises(AttestationError) as excinfo:
        require_attestation(PUBLIC, *files, verifier=NvidiaVerifier(), now=NOW)
    refused(excinfo, str(files[1]), "(cpu report)", "cannot verify a 'sev-snp' report",
            "does not accept CPU evidence it has not verified")


def fake_sdk(monkeypatch, gpu_claims: dict[str, Any], *, overall_nonce: str = FP,
             attest_ok: bool = True) -> dict[str, Any]:
    """A stand-in for nv_attestation_sdk's public calls, recording them."""
    calls: dict[str, Any] = {"cleared": 0}

    class Attestation:
        def clear_verifiers(self):
            calls["cleared"] += 1

        def set_name(self, name):
            calls["name"] = name

        def set_nonce(self, nonce):
            calls["nonce"] = nonce

        def set_claims_version(self, version):
            calls["claims_version"] = version

        def add_verifier(self, dev, env, url, evidence):
            calls["verifier"] = (dev, env, url, evidence)

        def attest(self, evidence_list):
            calls["evidence_list"] = evidence_list
            return attest_ok

        def validate_token(self, policy):
            calls["appraisal"] = json.loads(policy)
            return True

        def get_token(self):
            return json.dumps([["JWT", "sdk-jwt"], {"REMOTE_GPU_CLAIMS": [
                ["JWT", "overall-jwt"], {"GPU-0": "gpu0-jwt"}]}])

    tokens = {"overall-jwt": {"eat_nonce": overall_nonce, "x-nvidia-overall-att-result": True},
              "gpu0-jwt": gpu_claims}
    package = types.ModuleType("nv_attestation_sdk")
    package.attestation = types.ModuleType("nv_attestation_sdk.attestation")
    package.attestation.Attestation = Attestation
    package.attestation.Devices = types.SimpleNamespace(GPU="GPU")
    package.attestation.Environment = types.SimpleNamespace(REMOTE="REMOTE")
    package.utils = types.ModuleType("nv_attestation_sdk.utils")
    package.utils.nras_utils = types.ModuleType("nv_attestation_sdk.utils.nras_utils")
    package.utils.nras_utils.decode_nras_token = lambda url, token: tokens[token]
    for name, module in [("nv_attestation_sdk", package),
                         ("nv_attestation_sdk.attestation", package.attestation),
                         ("nv_attestation_sdk.utils", package.utils),
                         ("nv_attestation_sdk.utils.nras_utils", package.utils.nras_utils)]:
        monkeypatch.setitem(sys.modules, name, module)
    return calls


NRAS_GPU_CLAIMS = {"eat_nonce": FP, "measres": "success", "dbgstat": "disabled",
                   "secboot": True, "x-nvidia-gpu-driver-version": "570.133.20",
                   "x-nvidia-gpu-vbios-version": "96.00.CF.00.02"}


def cpu_verifier(evidence):
    return good_claims()["cpu"]


def test_nvidia_verifier_sends_the_bundle_to_nras_with_the_key_as_nonce(files, monkeypatch):
    calls = fake_sdk(monkeypatch, NRAS_GPU_CLAIMS)
    verifier = NvidiaVerifier(cpu_verifier=cpu_verifier, nras_url="https://nras.example/gpu")
    claims = verifier.verify(load_evidence(files[1]))
    assert calls["nonce"] == FP and calls["evidence_list"] == GPU_EVIDENCE["evidence_list"]
    assert calls["verifier"] == ("GPU", "REMOTE", "https://nras.example/gpu", "")
    assert calls["claims_version"] == "3.0" and calls["cleared"] == 2
    rules = calls["appraisal"]["authorization-rules"]
    assert rules["detached-claims"]["x-nvidia-gpu-attestation-report-nonce-match"] is True
    assert claims["gpus"] == [{"name": "GPU-0", "nonce": FP, "cc_mode": None, "debug": False,
                               "measurements_match": True, "driver_version": "570.133.20",
                               "vbios_version": "96.00.CF.00.02"}]
    # NRAS states no CC mode that smsd reads, so a policy that needs it refuses
    with pytest.raises(AttestationError) as excinfo:
        require_attestation(PUBLIC, files[0], files[1], verifier=verifier, now=NOW)
    refused(excinfo, "(gpu cc mode)", "not established")
    relaxed = write_json(files[0], policy_dict(gpu={**policy_dict()["gpu"], "cc_mode_on": False}))
    assert require_attestation(PUBLIC, relaxed, files[1], verifier=verifier, now=NOW).gpus == 1


@pytest.mark.parametrize(("setup", "needle"), [
    ({"attest_ok": False}, "did not accept it"),
    ({"overall_nonce": "00" * 32}, "for another nonce"),
    ({"gpu_claims": {}}, "GPU-0 has no valid signature"),
])
def test_nvidia_verifier_refusals(files, monkeypatch, setup, needle):
    gpu_claims = setup.pop("gpu_claims", NRAS_GPU_CLAIMS)
    fake_sdk(monkeypatch, gpu_claims, **setup)
    with pytest.raises(AttestationError) as excinfo:
        NvidiaVerifier(cpu_verifier=cpu_verifier).verify(load_evidence(files[1]))
    refused(excinfo, str(files[1]), "(gpu evidence)", needle)


def test_nvidia_verifier_needs_a_gpu_evidence_list(tmp_path, monkeypatch):
    fake_sdk(monkeypatch, NRAS_GPU_CLAIMS)
    path = write_json(tmp_path / "e.json", evidence_dict(gpu={"report": "x"}))
    with pytest.raises(AttestationError) as excinfo:
        NvidiaVerifier(cpu_verifier=cpu_verifier).verify(load_evidence(path))
    refused(excinfo, "(gpu evidence)", "evidence_list")
