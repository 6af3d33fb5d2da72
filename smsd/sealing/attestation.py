"""``--require-attestation POLICY``: check a server's attestation evidence before sealing to
its public key.

The server's recipient key pair is generated inside a confidential VM (AMD SEV-SNP or Intel
TDX, with an NVIDIA H100/H200 in CC mode); the CVM writes an *evidence bundle* (JSON) that
binds the public key to hardware-signed reports:

- CPU report ``report_data`` (64 bytes) = SHA-256(public key) ‖ SHA-256(canonical JSON of
  the bundle's ``created`` time and ``gpu`` evidence): :func:`expected_report_data`;
- GPU evidence nonce = SHA-256(public key) (hex).

The second half ties the bundle's time and GPU evidence to the hardware-signed CPU report,
so neither can be edited or swapped after the CVM wrote them.

A client seals only when a :class:`Verifier` turns that evidence into verified claims and
:func:`check_claims` finds them within the policy. Every refusal is an
:class:`AttestationError` of one line naming the file and the failed check. Nothing here
accepts evidence it has not verified: :class:`NvidiaVerifier` checks GPU evidence through
NVIDIA's attestation SDK (NRAS) and refuses CPU reports unless given a CPU verifier, since
smsd knows of no well-kept Python library that verifies SEV-SNP or TDX reports.

Verified claims (what a verifier returns; :func:`check_claims` reads only these)::

    {"cpu": {"tee": "sev-snp" | "tdx", "measurement": hex, "debug": bool,
             "report_data": hex (64 bytes)},
     "gpus": [{"name": str, "nonce": hex, "cc_mode": "on" | "off" | "devtools" | None,
               "debug": bool, "measurements_match": bool,
               "driver_version": str, "vbios_version": str}, ...]}

See docs/confidential-computing.md for the deployment, the file formats and the limits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from ..errors import SmsdError
from ..extras import require

__all__ = [
    "EVIDENCE_FORMAT",
    "NRAS_GPU_URL",
    "POLICY_FORMAT",
    "AttestationError",
    "AttestationPolicy",
    "AttestationReport",
    "Evidence",
    "GpuPolicy",
    "NvidiaVerifier",
    "Verifier",
    "check_claims",
    "expected_report_data",
    "load_evidence",
    "load_policy",
    "public_key_fingerprint",
    "require_attestation",
]

POLICY_FORMAT = "smsd-attestation-policy"
EVIDENCE_FORMAT = "smsd-attestation-evidence"
FORMAT_VERSION = 1
#: measurement length per CPU TEE: SEV-SNP MEASUREMENT; TDX MRTD ‖ RTMR0 ‖ RTMR1 ‖ RTMR2
MEASUREMENT_BYTES = {"sev-snp": 48, "tdx": 192}
#: how far in the future a bundle's ``created`` may lie (clocks differ)
CLOCK_SKEW_S = 300.0
#: NVIDIA Remote Attestation Service, GPU endpoint (claims version 3.0)
NRAS_GPU_URL = "https://nras.attestation.nvidia.com/v4/attest/gpu"

_MAX_POLICY_BYTES = 64 * 1024
_MAX_EVIDENCE_BYTES = 8 * 1024 * 1024
_HEX = re.compile(r"[0-9a-f]+")
_POLICY_KEYS = {"format", "version", "cpu_tee", "measurements", "forbid_debug", "gpu",
                "max_evidence_age_s"}
_POLICY_REQUIRED = {"format", "version", "cpu_tee", "measurements", "gpu", "max_evidence_age_s"}
_GPU_KEYS = {"cc_mode_on", "min_count", "driver_versions", "vbios_versions"}
_EVIDENCE_KEYS = {"format", "version", "public_key_sha256", "created", "cpu", "gpu"}

# NVIDIA appraisal rules for NRAS's results (claims 3.0), after NVIDIA's example policy.
_NVIDIA_APPRAISAL_POLICY = {
    "version": "4.0",
    "authorization-rules": {
        "type": "JWT",
        "overall-claims": {"x-nvidia-overall-att-result": True, "x-nvidia-ver": "3.0"},
        "detached-claims": {
            "measres": "success",
            "x-nvidia-gpu-arch-check": True,
            "x-nvidia-gpu-attestation-report-parsed": True,
            "x-nvidia-gpu-attestation-report-nonce-match": True,
            "x-nvidia-gpu-attestation-report-signature-verified": True,
            "x-nvidia-gpu-attestation-report-cert-chain": {
                "x-nvidia-cert-status": "valid", "x-nvidia-cert-ocsp-status": "good"},
            "x-nvidia-gpu-driver-rim-signature-verified": True,
            "x-nvidia-gpu-vbios-rim-signature-verified": True,
        },
    },
}


class AttestationError(SmsdError, ValueError):
    """Attestation evidence or policy refused: the message names the file and the check."""


def public_key_fingerprint(public_key_bytes: bytes) -> str:
    """SHA-256 (hex) of a raw 32-byte X25519 public key: what evidence is bound to."""
    if not isinstance(public_key_bytes, bytes) or len(public_key_bytes) != 32:
        raise ValueError("an X25519 public key is exactly 32 raw bytes")
    return hashlib.sha256(public_key_bytes).hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def expected_report_data(fingerprint: str, created: str, gpu: Mapping[str, Any] | None) -> str:
    """The CPU report's 64-byte ``report_data`` (hex) that binds a key, a bundle's
    ``created`` time and its ``gpu`` evidence: what the CVM asks its CPU TEE to sign."""
    bound = _canonical({"created": created, "gpu": gpu})
    return fingerprint + hashlib.sha256(bound).hexdigest()


# ---------------------------------------------------------------- files
def _read_json(path: Path, what: str, max_bytes: int) -> dict[str, Any]:
    def refuse(problem: str) -> AttestationError:
        return AttestationError(f"{what} {path}: {problem}")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise refuse(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
        return dict(pairs)

    def no_constant(name: str) -> None:
        raise refuse(f"{name} is not a JSON number")

    try:
        if path.stat().st_size > max_bytes:
            raise refuse(f"larger than {max_bytes} bytes")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise refuse("does not exist") from None
    except IsADirectoryError:
        raise refuse("is a folder, not a file") from None
    except OSError as exc:
        raise refuse(f"cannot be read ({exc.strerror or exc})") from None
    try:
        payload = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates,
                             parse_constant=no_constant)
    except UnicodeDecodeError:
        raise refuse("is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise refuse(f"is not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise refuse("is nested too deeply") from None
    if not isinstance(payload, dict):
        raise refuse("is not a JSON object")
    return payload


def _check_header(payload: dict[str, Any], fmt: str, refuse: Callable[[str], Exception]) -> None:
    if payload.get("format") != fmt:
        raise refuse(f"format is {payload.get('format')!r}, expected {fmt!r}")
    version = payload.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise refuse(f"version is {version!r}; this smsd reads version {FORMAT_VERSION}")


def _keys(obj: dict[str, Any], allowed: set[str], required: set[str], where: str,
          refuse: Callable[[str], Exception]) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise refuse(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
                     f" in {where}")
    missing = sorted(required - set(obj))
    if missing:
        raise refuse(f"missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
                     f" in {where}")


def _string_list(value: Any, name: str, refuse: Callable[[str], Exception]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or \
            not all(isinstance(v, str) and v for v in value):
        raise refuse(f"{name} must be a non-empty list of strings")
    return tuple(value)


@dataclass(frozen=True)
class GpuPolicy:
    """What every GPU's verified claims must show; ``None`` lists allow any version."""

    cc_mode_on: bool = True
    min_count: int = 1
    driver_versions: tuple[str, ...] | None = None
    vbios_versions: tuple[str, ...] | None = None


@dataclass(frozen=True)
class AttestationPolicy:
    """A client's requirements on the server's evidence (``load_policy`` reads one)."""

    cpu_tee: tuple[str, ...]
    measurements: tuple[str, ...]
    max_evidence_age_s: float
    forbid_debug: bool = True
    gpu: GpuPolicy | None = GpuPolicy()
    source: str = "<policy>"
    format: str = POLICY_FORMAT
    version: int = FORMAT_VERSION


def load_policy(path: str | os.PathLike) -> AttestationPolicy:
    """Read and validate a policy file; unknown keys, bad values → :class:`AttestationError`."""
    path = Path(path)

    def refuse(problem: str) -> AttestationError:
        return AttestationError(f"attestation policy {path}: {problem}")

    payload = _read_json(path, "attestation policy", _MAX_POLICY_BYTES)
    _check_header(payload, POLICY_FORMAT, refuse)
    _keys(payload, _POLICY_KEYS, _POLICY_REQUIRED, "the policy", refuse)

    cpu_tee = _string_list(payload["cpu_tee"], "cpu_tee", refuse)
    bad_tee = [t for t in cpu_tee if t not in MEASUREMENT_BYTES]
    if bad_tee:
        raise refuse(f"cpu_tee {bad_tee[0]!r} is not one of {', '.join(MEASUREMENT_BYTES)}")
    lengths = {2 * MEASUREMENT_BYTES[t]: t for t in cpu_tee}
    measurements = tuple(m.lower() for m in _string_list(payload["measurements"],
                                                         "measurements", refuse))
    for m in measurements:
        if not _HEX.fullmatch(m) or len(m) not in lengths:
            sizes = " or ".join(f"{n} hex digits ({t})" for n, t in sorted(lengths.items()))
            raise refuse(f"measurement {m[:16]!r}… is not {sizes}")

    age = payload["max_evidence_age_s"]
    if isinstance(age, bool) or not isinstance(age, (int, float)) or not 0 < age < math.inf:
        raise refuse(f"max_evidence_age_s must be a positive number of seconds, got {age!r}")

    forbid_debug = payload.get("forbid_debug", True)
    if not isinstance(forbid_debug, bool):
        raise refuse(f"forbid_debug must be true or false, got {forbid_debug!r}")

    gpu = payload["gpu"]
    gpu_policy: GpuPolicy | None = None
    if gpu is not None:
        if not isinstance(gpu, dict):
            raise refuse("gpu must be an object or null")
        _keys(gpu, _GPU_KEYS, set(), "gpu", refuse)
        cc_mode_on = gpu.get("cc_mode_on", True)
        if not isinstance(cc_mode_on, bool):
            raise refuse(f"gpu.cc_mode_on must be true or false, got {cc_mode_on!r}")
        min_count = gpu.get("min_count", 1)
        if type(min_count) is not int or min_count < 1:
            raise refuse(f"gpu.min_count must be an integer >= 1, got {min_count!r}")
        versions = {}
        for name in ("driver_versions", "vbios_versions"):
            value = gpu.get(name)
            versions[name] = None if value is None else _string_list(value, f"gpu.{name}",
                                                                     refuse)
        gpu_policy = GpuPolicy(cc_mode_on, min_count, **versions)

    return AttestationPolicy(cpu_tee=cpu_tee, measurements=measurements,
                             max_evidence_age_s=float(age), forbid_debug=forbid_debug,
                             gpu=gpu_policy, source=str(path))


@dataclass(frozen=True, eq=False)
class Evidence:
    """An evidence bundle: the key it is bound to, when, and the (opaque) CPU and GPU parts."""

    path: str
    public_key_sha256: str
    created: str
    created_unix: float
    cpu: Mapping[str, Any]
    gpu: Mapping[str, Any] | None


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str) or not value.endswith("Z"):
        return None
    try:
        when = datetime.fromisoformat(value[:-1] + "+00:00")
    except ValueError:
        return None
    return when.astimezone(timezone.utc).timestamp()


def load_evidence(path: str | os.PathLike) -> Evidence:
    """Read an evidence bundle file; its CPU and GPU parts are left to the verifier."""
    path = Path(path)

    def refuse(problem: str) -> AttestationError:
        return AttestationError(f"attestation evidence {path}: {problem}")

    payload = _read_json(path, "attestation evidence", _MAX_EVIDENCE_BYTES)
    _check_header(payload, EVIDENCE_FORMAT, refuse)
    _keys(payload, _EVIDENCE_KEYS, _EVIDENCE_KEYS, "the bundle", refuse)
    fingerprint = payload["public_key_sha256"]
    if not isinstance(fingerprint, str) or not _HEX.fullmatch(fingerprint) \
            or len(fingerprint) != 64:
        raise refuse("public_key_sha256 must be 64 lower-case hex digits")
    created = _parse_time(payload["created"])
    if created is None:
        raise refuse(f"created must be an ISO 8601 UTC time ending in Z, "
                     f"got {str(payload['created'])[:40]!r}")
    cpu, gpu = payload["cpu"], payload["gpu"]
    if not isinstance(cpu, dict) or not cpu:
        raise refuse("cpu must be a non-empty object (the CPU TEE's report)")
    if gpu is not None and (not isinstance(gpu, dict) or not gpu):
        raise refuse("gpu must be a non-empty object (the GPU evidence) or null")
    return Evidence(str(path), fingerprint, payload["created"], created, cpu, gpu)


# ---------------------------------------------------------------- verifying
class Verifier(Protocol):
    """Turns an evidence bundle into verified claims, or raises :class:`AttestationError`."""

    def verify(self, evidence: Evidence) -> Mapping[str, Any]: ...


#: checks a CPU TEE report against AMD's or Intel's certificate chain; returns the ``cpu``
#: claims (tee, measurement, debug, report_data) or raises
CpuVerifier = Callable[[Evidence], Mapping[str, Any]]


class NvidiaVerifier:
    """GPU evidence verified by NVIDIA's Remote Attestation Service through
    ``nv_attestation_sdk``; CPU evidence by ``cpu_verifier``, without which it refuses.

    The GPU part of the bundle is ``{"evidence_list": [...]}``, the list that the SDK's
    ``Attestation.get_evidence()`` returned inside the CVM with the key's fingerprint as
    nonce. NRAS's claims carry no CC-mode claim that smsd reads, so ``cc_mode`` is reported
    as unknown (``None``) and a policy asking for CC mode refuses these claims.
    """

    def __init__(self, *, cpu_verifier: CpuVerifier | None = None,
                 nras_url: str = NRAS_GPU_URL, service_key: str | None = None) -> None:
        self.cpu_verifier = cpu_verifier
        self.nras_url = nras_url
        self.service_key = service_key

    def verify(self, evidence: Evidence) -> dict[str, Any]:
        tee = evidence.cpu.get("tee", "unnamed")
        if self.cpu_verifier is None:
            raise AttestationError(
                f"{evidence.path}: attestation refused (cpu report): smsd cannot verify a "
                f"{tee!r} report against AMD's or Intel's certificate chain (it knows no "
                "well-kept Python verifier for SEV-SNP or TDX reports) and does not accept "
                "CPU evidence it has not verified")
        cpu = dict(self.cpu_verifier(evidence))
        gpus = [] if evidence.gpu is None else self._verify_gpus(evidence)
        return {"cpu": cpu, "gpus": gpus}

    def _verify_gpus(self, evidence: Evidence) -> list[dict[str, Any]]:
        def refuse(problem: str) -> AttestationError:
            return AttestationError(f"{evidence.path}: attestation refused (gpu evidence): "
                                    f"{problem}")

        evidence_list = (evidence.gpu or {}).get("evidence_list")
        if not isinstance(evidence_list, list) or not evidence_list:
            raise refuse("gpu.evidence_list must be the non-empty list of GPU evidence")
        from nv_attestation_sdk import attestation  # the optional extra
        from nv_attestation_sdk.utils import nras_utils

        client = attestation.Attestation()  # a process-wide singleton in the SDK
        client.clear_verifiers()
        try:
            client.set_name("smsd")
            client.set_nonce(evidence.public_key_sha256)
            client.set_claims_version("3.0")
            if self.service_key:
                client.set_service_key(self.service_key)
            client.add_verifier(attestation.Devices.GPU, attestation.Environment.REMOTE,
                                self.nras_url, "")
            if not client.attest(evidence_list):
                raise refuse(f"NVIDIA's verifier ({self.nras_url}) did not accept it")
            if not client.validate_token(json.dumps(_NVIDIA_APPRAISAL_POLICY)):
                raise refuse("NRAS's signed results do not meet NVIDIA's appraisal rules")
            results = json.loads(client.get_token())[1]["REMOTE_GPU_CLAIMS"]
            overall = nras_utils.decode_nras_token(self.nras_url, results[0][1])
            if not overall or overall.get("eat_nonce") != evidence.public_key_sha256:
                raise refuse("NRAS's overall result is unsigned or for another nonce")
            gpus = []
            for name, token in sorted(results[1].items()):
                claims = nras_utils.decode_nras_token(self.nras_url, token)
                if not claims:
                    raise refuse(f"NRAS's result for {name} has no valid signature")
                gpus.append({
                    "name": name,
                    "nonce": claims.get("eat_nonce"),
                    "cc_mode": None,  # not among the NRAS claims smsd reads
                    "debug": claims.get("dbgstat") != "disabled",
                    "measurements_match": claims.get("measres") == "success",
                    "driver_version": claims.get("x-nvidia-gpu-driver-version"),
                    "vbios_version": claims.get("x-nvidia-gpu-vbios-version"),
                })
            return gpus
        except AttestationError:
            raise
        except Exception as exc:  # the SDK's and NRAS's failures, whatever their type
            raise refuse(f"{type(exc).__name__}: {exc}") from None
        finally:
            client.clear_verifiers()


# ---------------------------------------------------------------- policy logic
@dataclass(frozen=True)
class AttestationReport:
    """What :func:`check_claims` checked and found."""

    evidence: str
    policy: str
    fingerprint: str
    cpu_tee: str
    measurement: str
    age_s: float
    gpus: int
    driver_versions: tuple[str, ...]
    vbios_versions: tuple[str, ...]
    checks: tuple[str, ...]

    def summary(self) -> str:
        gpu = (f"{self.gpus} GPU(s), driver {'/'.join(self.driver_versions)}, VBIOS "
               f"{'/'.join(self.vbios_versions)}") if self.gpus else "no GPU"
        return (f"attestation {self.evidence} meets {self.policy}: key {self.fingerprint[:16]}…, "
                f"{self.cpu_tee} measurement {self.measurement[:16]}…, {gpu}, "
                f"{self.age_s:.0f} s old")


def check_claims(policy: AttestationPolicy, claims: Mapping[str, Any],
                 public_key_fingerprint: str, now: float, *,
                 evidence: Evidence) -> AttestationReport:
    """Check a verifier's ``claims`` about ``evidence`` against ``policy`` for the key being
    sealed to (its fingerprint) at time ``now`` (Unix seconds).

    The bundle's ``created`` time and GPU evidence count only through the CPU report's
    verified ``report_data``, which must equal :func:`expected_report_data`. Returns what
    was checked; raises :class:`AttestationError` at the first check that fails.
    """
    source = evidence.path

    def refuse(check: str, problem: str) -> AttestationError:
        return AttestationError(f"{source}: attestation refused ({check}): {problem}")

    def get(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
        value = obj.get(key) if isinstance(obj, Mapping) else None
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise refuse("claims", f"verified claims lack {where}{key}")
        return value

    fp = public_key_fingerprint
    checks: list[str] = []
    cpu = get(claims, "cpu", Mapping, "")
    tee = get(cpu, "tee", str, "cpu.")
    if tee not in policy.cpu_tee:
        raise refuse("cpu tee", f"the CPU TEE is {tee!r}; the policy allows "
                                f"{', '.join(policy.cpu_tee)}")
    checks.append("cpu tee")

    created = evidence.created
    report_data = get(cpu, "report_data", str, "cpu.").lower()
    if report_data[:64] != fp:
        raise refuse("key binding", f"the CPU report is bound to key {report_data[:16]}…, "
                                    f"not to the key being sealed to ({fp[:16]}…)")
    if report_data != expected_report_data(fp, created, evidence.gpu):
        raise refuse("bundle binding", "the CPU report's report_data does not bind this "
                                       f"bundle's created time ({created}) and GPU evidence")
    checks += ["key binding", "bundle binding"]

    age = now - evidence.created_unix
    if age < -CLOCK_SKEW_S:
        raise refuse("freshness", f"the evidence is dated {created}, {-age:.0f} s in the future")
    if age > policy.max_evidence_age_s:
        raise refuse("freshness", f"the evidence is {age:.0f} s old; the policy allows "
                                  f"{policy.max_evidence_age_s:.0f} s")
    checks.append("freshness")

    measurement = get(cpu, "measurement", str, "cpu.").lower()
    if measurement not in policy.measurements:
        raise refuse("measurement", f"{tee} measurement {measurement[:16]}… is not in the "
                                    f"policy's allow-list ({len(policy.measurements)} values)")
    checks.append("measurement")

    if policy.forbid_debug:
        if get(cpu, "debug", bool, "cpu.") is not False:
            raise refuse("cpu debug", f"the {tee} guest runs with debugging allowed")
        checks.append("cpu debug off")

    drivers: list[str] = []
    vbioses: list[str] = []
    gpus = claims.get("gpus", [])
    if policy.gpu is not None:
        gp = policy.gpu
        if not isinstance(gpus, list) or len(gpus) < gp.min_count:
            count = len(gpus) if isinstance(gpus, list) else 0
            raise refuse("gpu count", f"{count} verified GPU(s); the policy needs "
                                      f"at least {gp.min_count}")
        for i, gpu in enumerate(gpus):
            name = gpu.get("name", f"GPU-{i}") if isinstance(gpu, Mapping) else f"GPU-{i}"
            where = f"gpus[{i}]."
            if get(gpu, "nonce", str, where).lower() != fp:
                raise refuse("key binding", f"{name}'s evidence nonce is not the fingerprint "
                                            f"of the key being sealed to ({fp[:16]}…)")
            if get(gpu, "measurements_match", bool, where) is not True:
                raise refuse("gpu measurements", f"{name}'s measurements do not match "
                                                 "NVIDIA's reference values")
            if gp.cc_mode_on and gpu.get("cc_mode") != "on":
                raise refuse("gpu cc mode", f"{name}'s CC mode is "
                                            f"{gpu.get('cc_mode') or 'not established'}, "
                                            "the policy needs 'on'")
            if policy.forbid_debug and get(gpu, "debug", bool, where) is not False:
                raise refuse("gpu debug", f"{name} runs with debugging enabled")
            driver = get(gpu, "driver_version", str, where)
            vbios = get(gpu, "vbios_version", str, where)
            if gp.driver_versions is not None and driver not in gp.driver_versions:
                raise refuse("gpu driver", f"{name}'s driver {driver} is not one the policy "
                                           f"allows ({', '.join(gp.driver_versions)})")
            if gp.vbios_versions is not None and vbios not in gp.vbios_versions:
                raise refuse("gpu vbios", f"{name}'s VBIOS {vbios} is not one the policy "
                                          f"allows ({', '.join(gp.vbios_versions)})")
            drivers.append(driver)
            vbioses.append(vbios)
        checks += ["gpu key binding", "gpu measurements"]
        checks += ["gpu cc mode"] if gp.cc_mode_on else []
        checks += ["gpu debug off"] if policy.forbid_debug else []
        checks += ["gpu driver"] if gp.driver_versions is not None else []
        checks += ["gpu vbios"] if gp.vbios_versions is not None else []

    return AttestationReport(
        evidence=source, policy=policy.source, fingerprint=fp, cpu_tee=tee,
        measurement=measurement, age_s=max(age, 0.0), gpus=len(drivers),
        driver_versions=tuple(sorted(set(drivers))), vbios_versions=tuple(sorted(set(vbioses))),
        checks=tuple(checks))


def require_attestation(public_key_bytes: bytes, policy_path: str | os.PathLike,
                        evidence_path: str | os.PathLike, *, verifier: Verifier | None = None,
                        now: float | None = None) -> AttestationReport:
    """Refuse (:class:`AttestationError`) unless the evidence at ``evidence_path``, once
    verified, shows the raw X25519 ``public_key_bytes`` inside a CVM that meets the policy.

    With no ``verifier``, :class:`NvidiaVerifier` is used, which needs the ``attestation``
    extra (:class:`~smsd.extras.MissingExtraError` before any work when it is missing).
    """
    if verifier is None:
        require("attestation")
        verifier = NvidiaVerifier()
    fp = public_key_fingerprint(public_key_bytes)
    policy = load_policy(policy_path)
    evidence = load_evidence(evidence_path)
    if evidence.public_key_sha256 != fp:
        raise AttestationError(
            f"{evidence.path}: attestation refused (key binding): the evidence is for key "
            f"{evidence.public_key_sha256[:16]}…, not for the key being sealed to ({fp[:16]}…)")
    claims = verifier.verify(evidence)
    return check_claims(policy, claims, fp, time.time() if now is None else now,
                        evidence=evidence)
