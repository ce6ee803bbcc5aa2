"""``concierge stats``: reproduce any safety-signal statistic from the command line.

Every command prints exactly one JSON object on stdout.  Bad input is reported as a
click usage error (exit status 2), never as a traceback.
"""

from __future__ import annotations

import json
import math
from typing import Any

import click

from surveillance_stream.statistics.disproportionality import disproportionality
from surveillance_stream.statistics.ebgm import GammaMixturePrior, ebgm_scores
from surveillance_stream.statistics.sequential import (
    CriticalValue,
    binomial_critical_value,
    binomial_llr,
    poisson_critical_value,
    poisson_llr,
    risk_adjusted_cusum,
)

COUNT = click.IntRange(min=0)
POSITIVE = click.FloatRange(min=0.0, min_open=True)
ALPHA = click.FloatRange(min=0.0, max=0.5, min_open=True)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _emit(payload: dict[str, Any]) -> None:
    click.echo(json.dumps(_clean(payload), allow_nan=False, sort_keys=False))


class PriorType(click.ParamType):
    """Five comma-separated numbers: alpha1,beta1,alpha2,beta2,p (openEBGM order)."""

    name = "a1,b1,a2,b2,p"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, GammaMixturePrior):
            return value
        try:
            parts = [float(x) for x in str(value).split(",")]
            return GammaMixturePrior.from_sequence(parts)
        except ValueError as exc:
            self.fail(f"{value!r} is not a valid prior: {exc}", param, ctx)


def _critical_value(
    model: str, T: float | None, N: int | None, z: float | None, M: int, alpha: float
) -> CriticalValue:
    try:
        if model == "poisson":
            if T is None:
                raise click.UsageError("--T is required for --model poisson")
            return poisson_critical_value(float(T), M, alpha)
        if N is None or z is None:
            raise click.UsageError("--N and --z are required for --model binomial")
        return binomial_critical_value(int(N), float(z), M, alpha)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


@click.group(name="stats", context_settings={"help_option_names": ["-h", "--help"]})
def stats() -> None:
    """Safety-signal statistics: disproportionality, EBGM, MaxSPRT and CUSUM."""


@stats.command(name="disproportionality")
@click.option("--a", "a", type=COUNT, required=True, help="Reports: device WITH the event.")
@click.option("--b", "b", type=COUNT, required=True, help="Reports: device WITHOUT the event.")
@click.option(
    "--c", "c", type=COUNT, required=True, help="Reports: other devices (same class) WITH it."
)
@click.option(
    "--d", "d", type=COUNT, required=True, help="Reports: other devices (same class) WITHOUT it."
)
@click.option(
    "--confidence",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    default=0.95,
    show_default=True,
    help="Confidence level of the PRR/ROR intervals and credibility of the IC interval.",
)
@click.option(
    "--haldane/--no-haldane",
    default=False,
    show_default=True,
    help="Add 0.5 to every cell for PRR/ROR when any cell is zero.",
)
def disproportionality_cmd(
    a: int, b: int, c: int, d: int, confidence: float, haldane: bool
) -> None:
    """PRR, ROR, chi-squared (with and without Yates), IC with IC025/IC975, Evans rule."""
    result = disproportionality(a, b, c, d, confidence=confidence, haldane=haldane)
    _emit(result.to_dict())


@stats.command(name="maxsprt-cv")
@click.option(
    "--model",
    type=click.Choice(["poisson", "binomial"]),
    required=True,
    help="Continuous Poisson or binomial MaxSPRT.",
)
@click.option(
    "--T", "T", type=POSITIVE, help="Poisson: upper limit on surveillance, in expected events."
)
@click.option("--N", "N", type=click.IntRange(min=1), help="Binomial: maximum total events.")
@click.option("--z", "z", type=POSITIVE, help="Binomial: matching ratio (p0 = 1/(1+z)).")
@click.option(
    "--M",
    "M",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Minimum events (Poisson) or cases (binomial) before a signal is allowed.",
)
@click.option("--alpha", type=ALPHA, default=0.05, show_default=True, help="Type I error.")
def maxsprt_cv(
    model: str, T: float | None, N: int | None, z: float | None, M: int, alpha: float
) -> None:
    """Exact MaxSPRT critical value and the alpha it attains."""
    _emit(_critical_value(model, T, N, z, M, alpha).to_dict())


@stats.command(name="maxsprt")
@click.option(
    "--model",
    type=click.Choice(["poisson", "binomial"]),
    required=True,
    help="Continuous Poisson or binomial MaxSPRT.",
)
@click.option("--observed", type=COUNT, help="Poisson: observed events so far.")
@click.option("--expected", type=POSITIVE, help="Poisson: expected events so far under H0.")
@click.option("--cases", type=COUNT, help="Binomial: cases (events in the risk window) so far.")
@click.option("--controls", type=COUNT, help="Binomial: controls so far.")
@click.option("--z", "z", type=POSITIVE, help="Binomial: matching ratio (p0 = 1/(1+z)).")
@click.option(
    "--T", "T", type=POSITIVE, help="Poisson: upper limit, in expected events (to compute cv)."
)
@click.option("--N", "N", type=click.IntRange(min=1), help="Binomial: maximum total events.")
@click.option(
    "--M",
    "M",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Minimum events (Poisson) or cases (binomial) before a signal is allowed.",
)
@click.option("--alpha", type=ALPHA, default=0.05, show_default=True, help="Type I error.")
@click.option("--cv", "cv", type=POSITIVE, help="Use this critical value instead of computing one.")
def maxsprt(
    model: str,
    observed: int | None,
    expected: float | None,
    cases: int | None,
    controls: int | None,
    z: float | None,
    T: float | None,
    N: int | None,
    M: int,
    alpha: float,
    cv: float | None,
) -> None:
    """Current MaxSPRT log-likelihood ratio and whether it crosses the critical value.

    Without --cv and without the design (--T, or --N with --z) cv and signal are null.
    """
    payload: dict[str, Any] = {"model": model}
    if model == "poisson":
        if observed is None or expected is None:
            raise click.UsageError("--observed and --expected are required for --model poisson")
        llr = poisson_llr(observed, expected)
        count = observed
        payload.update(observed=observed, expected=expected)
        have_design = T is not None
    else:
        if cases is None or controls is None or z is None:
            raise click.UsageError("--cases, --controls and --z are required for --model binomial")
        llr = binomial_llr(cases, controls, z)
        count = cases
        payload.update(cases=cases, controls=controls, z=z)
        have_design = N is not None
        if N is not None and cases + controls > N:
            raise click.UsageError(f"cases + controls = {cases + controls} exceeds --N {N}")
    payload["llr"] = llr
    alpha_attained = None
    if cv is None and have_design:
        design = _critical_value(model, T, N, z, M, alpha)
        cv, alpha_attained = design.cv, design.alpha_attained
    payload.update(cv=cv, alpha_attained=alpha_attained, M=M)
    payload["signal"] = None if cv is None else bool(llr >= cv and count >= M)
    _emit(payload)


@stats.command(name="ebgm")
@click.option("--n", "n", type=COUNT, required=True, help="Observed count for the pair.")
@click.option("--e", "e", type=POSITIVE, required=True, help="Expected count for the pair.")
@click.option(
    "--prior",
    type=PriorType(),
    required=True,
    help="Two-gamma prior as alpha1,beta1,alpha2,beta2,p (openEBGM order; betas are rates).",
)
@click.option(
    "--lower", type=ALPHA, default=0.05, show_default=True, help="Lower posterior quantile."
)
@click.option(
    "--upper",
    type=click.FloatRange(0.5, 1.0, max_open=True),
    default=0.95,
    show_default=True,
    help="Upper posterior quantile.",
)
def ebgm_cmd(n: int, e: float, prior: GammaMixturePrior, lower: float, upper: float) -> None:
    """EBGM with EB05/EB95 (DuMouchel 1999) for one observed/expected pair."""
    result = ebgm_scores(n, e, prior, lower=lower, upper=upper)
    payload: dict[str, Any] = result.to_dict()
    payload["prior"] = list(prior.as_tuple())
    _emit(payload)


def _parse_list(text: str, kind: type, option: str) -> list[Any]:
    try:
        return [kind(x) for x in text.split(",") if x.strip() != ""]
    except ValueError as exc:
        raise click.BadParameter(f"not a comma-separated list: {exc}", param_hint=option) from exc


@stats.command(name="cusum")
@click.option(
    "--outcomes", required=True, help="Comma-separated 0/1 outcomes, in order (e.g. 0,1,0)."
)
@click.option(
    "--risks", required=True, help="Comma-separated predicted risks in (0, 1), one per outcome."
)
@click.option(
    "--odds-ratio",
    type=POSITIVE,
    default=2.0,
    show_default=True,
    help="Odds ratio under the alternative.",
)
@click.option(
    "--h", "h", type=POSITIVE, default=4.5, show_default=True, help="Signalling threshold."
)
def cusum(outcomes: str, risks: str, odds_ratio: float, h: float) -> None:
    """Risk-adjusted Bernoulli CUSUM (Steiner et al. 2000) over a sequence."""
    ys = _parse_list(outcomes, int, "--outcomes")
    ps = _parse_list(risks, float, "--risks")
    try:
        steps = risk_adjusted_cusum(ys, ps, odds_ratio=odds_ratio, threshold=h)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    _emit(
        {
            "scores": [s.score for s in steps],
            "signals": [i for i, s in enumerate(steps) if s.signal],
            "final_score": steps[-1].score if steps else 0.0,
            "odds_ratio": odds_ratio,
            "h": h,
        }
    )
