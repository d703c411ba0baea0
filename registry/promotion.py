"""Promotion: move alias `champion` to a version only when the gates pass, and keep every decision as history.

Gates (params.yaml `registry.gates`):
- ready: the version finished registering (not left pending by an interrupted registration) and carries a content
  hash (so its files can be verified);
- metrics: every gated metric the current champion has is not worse on the candidate beyond `tolerance`
  (`higher` / `lower` is better, per metric); a metric with sibling settings (steering success: `strength`,
  `every`, `gain` and `decay`, SMITIN's push interval, an added trait's push multiple and fade, the monitor's
  `smooth_steps` / `hold_steps` / `hold_floor` / `prompt_relative`, and `judge`, how success was judged) is
  compared only when both were measured with the same settings;
- compatible (probe sets): trained on the current champion generator (same fingerprint).
`--force` promotes anyway (not a version without a content hash or left pending); the event records which gates were
overridden.

The whole read-champion -> gates -> move alias -> record event sequence runs under the model's registry lock
(`Registry.lock`), so two promotions at once, from two processes or machines, are serialised: the second one sees
the first one's champion, and the history's `from` of each event is the `to` of the one before."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from registry.errors import ModelNotFound, PromotionRefused, RegistryError
from registry.history import read_history, record_event
from registry.registration import clean_interrupted
from registry.store import CHALLENGER, CHAMPION, PENDING, TAG, GatesParams, Registry, translate_errors


@dataclass
class Gate:
    name: str
    passed: bool
    detail: str

    def __str__(self) -> str:
        return f"{self.name}: {'ok' if self.passed else 'FAILED'} ({self.detail})"


@dataclass
class Promotion:
    name: str
    version: str
    previous: str | None
    gates: list[Gate] = field(default_factory=list)
    promoted: bool = False
    forced: bool = False
    event: dict = field(default_factory=dict)
    cleaned: list[str] = field(default_factory=list)  # versions of interrupted registrations removed first

    @property
    def failed(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]


def version_metrics(mv) -> dict[str, float]:
    try:
        return json.loads(mv.tags.get(TAG + "metrics", "{}"))
    except ValueError:
        return {}


def alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


# settings a metric is only comparable at: steering strength, push interval, the monitor and how success was judged;
# the ensemble size and number of pieces of a Coconet likelihood
SETTINGS = (
    "strength",
    "every",
    "gain",
    "prompt_relative",
    "decay",
    "smooth_steps",
    "hold_steps",
    "hold_floor",
    "judge",
    "ensemble",
    "pieces",
)
# what a version registered before a setting was logged had: the push faded with exponent 0.5, the paper's monitor
# reading the probes as they are, success judged by the detector alone
SETTING_DEFAULTS = {
    "decay": 0.5,
    "smooth_steps": 1.0,
    "hold_steps": 0.0,
    "hold_floor": 0.0,
    "judge": 1.0,
    "gain": 1.0,
    "prompt_relative": 0.0,
}


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def metric_gate(candidate, champion, gates: GatesParams, kind: str) -> Gate:
    if champion is None:
        return Gate("metrics", True, "no current champion to compare with")
    cand, champ = version_metrics(candidate), version_metrics(champion)
    problems, compared, skipped = [], [], []
    for metric, direction, slack in gates.rules(kind):
        if metric not in champ:
            continue
        if metric not in cand:
            problems.append(f"{metric} missing (champion v{champion.version} has {_fmt(champ[metric])})")
            continue
        # steering metrics carry the settings they were run at; a setting only one side recorded (a version
        # registered before it was logged) does not block the comparison, unless its value then is known
        # (SETTING_DEFAULTS: success judged by the detector alone is not success judged by it and by strength)
        node = metric.rsplit(".", 1)[0]
        differ = []
        for name in SETTINGS:
            a = cand.get(f"{node}.{name}", SETTING_DEFAULTS.get(name))
            b = champ.get(f"{node}.{name}", SETTING_DEFAULTS.get(name))
            if a is not None and b is not None and a != b:
                differ.append(f"{name} {_fmt(a)} vs {_fmt(b)}")
        if differ:
            skipped.append(f"{metric} ({', '.join(differ)})")
            continue
        c, ref = cand[metric], champ[metric]
        worse = c < ref - slack if direction == "higher" else c > ref + slack
        compared.append(metric)
        if worse:
            sign = "<" if direction == "higher" else ">"
            problems.append(
                f"{metric} {_fmt(c)} {sign} champion v{champion.version} {_fmt(ref)} "
                f"{'-' if direction == 'higher' else '+'} tolerance {_fmt(slack)}"
            )
    not_compared = f"; not compared, measured with other settings: {', '.join(skipped)}" if skipped else ""
    if problems:
        return Gate("metrics", False, "; ".join(problems) + not_compared)
    if not compared:
        return Gate("metrics", True, f"no gated metric in common with champion v{champion.version}{not_compared}")
    return Gate(
        "metrics",
        True,
        f"{', '.join(compared)} within tolerance of champion v{champion.version} or better{not_compared}",
    )


def compatibility_gate(reg: Registry, candidate) -> Gate:
    fp = candidate.tags.get(TAG + "generator_fingerprint", "")
    if candidate.tags.get(TAG + "generator_backend") == "musicgen":
        # MusicGen weights are referenced by path, not registered: `smitin generate` checks the fingerprint of the
        # MusicGen it loads against this one (and refuses another model)
        return Gate(
            "compatible",
            True,
            f"trained on MusicGen {fp[:12]} at "
            f"{candidate.tags.get(TAG + 'generator_path', '?')} (not registered; "
            f"checked against the loaded weights when generating)",
        )
    gen_name = reg.settings.generator_name
    gen = (
        alias_version(reg.client, gen_name, CHAMPION)
        if reg.client.search_registered_models(f"name = '{gen_name}'")
        else None
    )
    if gen is None:
        return Gate(
            "compatible", False, f"{gen_name} has no champion to check the probe set against; promote a generator first"
        )
    gen_fp = gen.tags.get(TAG + "fingerprint", "")
    if fp != gen_fp:
        return Gate(
            "compatible",
            False,
            f"trained on generator {fp[:12] or '?'} (v{candidate.tags.get(TAG + 'generator_version', '?')}), "
            f"champion {gen_name} v{gen.version} is {gen_fp[:12]}",
        )
    return Gate("compatible", True, f"trained on champion {gen_name} v{gen.version} ({gen_fp[:12]})")


def ready_gate(candidate) -> Gate:
    if PENDING in candidate.tags:
        return Gate(
            "ready",
            False,
            "its registration did not complete (interrupted); the next registration or promotion of this model "
            "removes it",
        )
    ready = candidate.status == "READY" and bool(candidate.tags.get(TAG + "content_hash"))
    if ready:
        return Gate("ready", True, "registered, content hash recorded")
    has_hash = "present" if candidate.tags.get(TAG + "content_hash") else "missing"
    return Gate("ready", False, f"status {candidate.status}, content hash {has_hash}")


def evaluate_gates(reg: Registry, name: str, candidate, champion) -> list[Gate]:
    kind = candidate.tags.get(TAG + "kind", "probe_set" if name != reg.settings.generator_name else "generator")
    gates = [ready_gate(candidate)]
    gates.append(metric_gate(candidate, champion, reg.settings.gates, kind))
    if kind == "probe_set":
        gates.append(compatibility_gate(reg, candidate))
    return gates


def _candidate(reg: Registry, name: str, version: str | int | None):
    c = reg.client
    if not c.search_registered_models(f"name = '{name}'"):
        raise ModelNotFound(f"no registered model named {name!r}; see `smitin registry list`")
    if version is not None:
        from mlflow.exceptions import MlflowException

        try:
            return c.get_model_version(name, str(version))
        except MlflowException:
            raise ModelNotFound(f"{name} has no version {version}") from None
    mv = alias_version(c, name, CHALLENGER)
    if mv is None:
        versions = [v for v in c.search_model_versions(f"name = '{name}'") if PENDING not in v.tags]
        if not versions:
            raise ModelNotFound(f"{name} has no versions")
        mv = max(versions, key=lambda v: int(v.version))
    return mv


def promote(
    reg: Registry,
    model: str,
    version: str | int | None = None,
    *,
    force: bool = False,
    reason: str = "",
    dry_run: bool = False,
) -> Promotion:
    """Move `champion` to `version` (default: the challenger, else the newest) if the gates pass or `force`.
    A refusal is recorded in the history too, then raised as `PromotionRefused` naming the failed gates."""
    reg.check()
    with translate_errors(reg):
        name = reg.resolve_name(model)
    with translate_errors(reg), reg.lock(f"promotion of {name}", name):
        c = reg.client
        # a registration interrupted since (its challenger alias may point at a half-registered version)
        cleaned = [] if dry_run or not c.search_registered_models(f"name = '{name}'") else clean_interrupted(reg, name)
        candidate = _candidate(reg, name, version)
        champion = alias_version(c, name, CHAMPION)
        result = Promotion(name, str(candidate.version), str(champion.version) if champion else None, cleaned=cleaned)
        if champion is not None and str(champion.version) == str(candidate.version):
            result.gates = [Gate("noop", True, f"v{candidate.version} is already the champion")]
            return result
        result.gates = evaluate_gates(reg, name, candidate, champion)
        if dry_run:
            return result
        failed = result.failed
        base = {
            "alias": CHAMPION,
            "from": result.previous,
            "to": result.version,
            "why": reason or "",
            "gates": [str(g) for g in result.gates],
        }
        if failed and not force:
            result.event = record_event(c, name, {**base, "action": "refused"})
            result.event.pop("key")
            raise PromotionRefused(
                f"{name} v{candidate.version} not promoted: "
                + "; ".join(f"gate {g.name} failed: {g.detail}" for g in failed)
                + " (use --force to override, it is recorded)"
            )
        if failed and not candidate.tags.get(TAG + "content_hash"):
            raise RegistryError(
                f"{name} v{candidate.version} has no content hash: it was not registered by smitin "
                f"and cannot be verified, not even with --force"
            )
        if failed and PENDING in candidate.tags:
            raise RegistryError(
                f"{name} v{candidate.version} is half-registered (its registration was interrupted): "
                f"it cannot be promoted, not even with --force"
            )
        c.set_registered_model_alias(name, CHAMPION, result.version)
        try:
            result.event = record_event(
                c,
                name,
                {
                    **base,
                    "action": "force-promote" if failed else "promote",
                    "forced": bool(failed),
                    "overridden": [g.name for g in failed],
                },
            )
            result.event.pop("key")
        except Exception:
            # No history, no promotion: put the previous champion back.
            if champion is not None:
                c.set_registered_model_alias(name, CHAMPION, result.previous)
            else:
                c.delete_registered_model_alias(name, CHAMPION)
            raise
        c.set_model_version_tag(name, result.version, TAG + "promoted_at", result.event["when"])
        result.promoted, result.forced = True, bool(failed)
        return result


def history(reg: Registry, model: str) -> tuple[str, list[dict]]:
    reg.check()
    with translate_errors(reg):
        name = reg.resolve_name(model)
        if not reg.client.search_registered_models(f"name = '{name}'"):
            raise ModelNotFound(f"no registered model named {name!r}; see `smitin registry list`")
        return name, read_history(reg.client, name)


def stale_probe_sets(reg: Registry, generator_fingerprint: str) -> list[str]:
    """Probe-set models whose champion was trained on another generator than `generator_fingerprint`."""
    out = []
    prefix = reg.settings.probe_set_prefix
    for rm in reg.registered_models():
        if not rm.name.startswith(prefix) or reg.probe_set_backend(rm.name) != "builtin":
            continue
        champ = alias_version(reg.client, rm.name, CHAMPION)
        if champ is not None and champ.tags.get(TAG + "generator_fingerprint") != generator_fingerprint:
            out.append(f"{rm.name} v{champ.version}")
    return out
