"""Pure statistics for medical device safety signal detection (scipy/numpy only).

* :mod:`.disproportionality` -- PRR, ROR, chi-squared, IC and the Evans rule on a 2x2 table
* :mod:`.ebgm` -- DuMouchel's empirical Bayes geometric mean with a two-gamma prior
* :mod:`.sequential` -- Poisson/binomial MaxSPRT with exact critical values, risk-adjusted CUSUM

See ``docs/explanation/statistics.md`` for formulas, conventions and references.
"""

from surveillance_stream.statistics.disproportionality import (
    DisproportionalityResult,
    chi_squared,
    disproportionality,
    evans_signal,
    expected_count,
    information_component,
    information_component_of,
    prr,
    ror,
)
from surveillance_stream.statistics.ebgm import (
    EBGMResult,
    GammaMixturePrior,
    PriorFit,
    ebgm,
    ebgm_scores,
    fit_prior,
    log_marginal_likelihood,
    posterior_cdf,
    posterior_quantile,
    qn,
)
from surveillance_stream.statistics.sequential import (
    CriticalValue,
    CusumStep,
    RiskAdjustedCusum,
    binomial_alpha,
    binomial_critical_value,
    binomial_llr,
    grouped_cusum,
    poisson_alpha,
    poisson_critical_value,
    poisson_llr,
    poisson_signal_times,
    risk_adjusted_cusum,
)

__all__ = [
    "CriticalValue",
    "CusumStep",
    "DisproportionalityResult",
    "EBGMResult",
    "GammaMixturePrior",
    "PriorFit",
    "RiskAdjustedCusum",
    "binomial_alpha",
    "binomial_critical_value",
    "binomial_llr",
    "chi_squared",
    "disproportionality",
    "ebgm",
    "ebgm_scores",
    "evans_signal",
    "expected_count",
    "fit_prior",
    "grouped_cusum",
    "information_component",
    "information_component_of",
    "log_marginal_likelihood",
    "poisson_alpha",
    "poisson_critical_value",
    "poisson_llr",
    "poisson_signal_times",
    "posterior_cdf",
    "posterior_quantile",
    "prr",
    "qn",
    "risk_adjusted_cusum",
    "ror",
]
