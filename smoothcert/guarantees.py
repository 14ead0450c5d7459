"""What a certificate promises, in words: the `guarantee` a result carries beside its numbers
(docs/guarantees.md says the same at length).

Four scopes:
- "smoothed": a fixed σ without the memory. With probability ≥ 1 − α over this run's noise
  the classifier smoothed at σ predicts the class on the whole ball.
- "per_sigma": a σ searched for this input, without the memory. The same statement about
  the classifier smoothed at *this* σ only: it says nothing about the service's classifier
  with per-input σ at other inputs, and two such certificates may contradict each other.
- "selector": a σ selector's answer (smoothcert.selector). With probability ≥ 1 − α over the
  job's noise (α/2 for the estimator's choice of σ, α/2 for the class at that σ) the selector
  (the classifier smoothed at the σ its smoothed estimator chooses, input by input) predicts
  the class on the whole ball. It needs no memory: the function never changes.
- "memory": an answer of the memory-enhanced classifier. It follows from one committed
  entry (the root, whose own sampling produced the ball) and is wrong only if that entry
  is; each entry is wrong with probability ≤ α, all of them hold at once with probability
  ≥ 1 − (entries)·α, and a query chosen after probing the memory can aim at the wrong ones.

A seed the caller chose voids the probability: the caller may have picked it after seeing
results. Torch-free.
"""

from __future__ import annotations

from smoothcert.results import Certificate

SCOPES = ("smoothed", "per_sigma", "selector", "memory")


def scope(cert: Certificate, *, memory: bool) -> str:
    """The scope of `cert`: "memory" when it came through a memory, else "per_sigma" for a
    searched σ, else "smoothed"."""
    if memory and cert.memory is not None:
        return "memory"
    if cert.selector is not None:
        return "selector"
    return "per_sigma" if cert.search is not None else "smoothed"


def guarantee(cert: Certificate, *, memory: bool, seed_source: str | None = None) -> dict[str, str]:
    """{"scope", "statement"}: what `cert` promises, in one paragraph."""
    where = scope(cert, memory=memory)
    level = f"1 − α = 1 − {cert.alpha!r}"
    if cert.sampling == "sequential":
        level += " (α spent over the looks of sequential sampling)"
    if cert.abstained:
        claim = "No claim: the certificate abstains."
        if where == "memory":
            claim += (" The abstention is part of the memory: later balls of other classes are kept away "
                      "from this input.")
    else:
        ball = f"class {cert.prediction} on the whole open ℓ2 ball of radius {cert.radius!r} around the input"
        if where == "memory":
            m = cert.memory
            root = f"entry {m.root}" + (f" (job {m.root_job})" if m.root_job else "")
            claim = (
                f"The memory-enhanced classifier of {m.namespace or 'this memory'} answers {ball}. The answer "
                f"follows from one committed certificate, {root}: σ = {cert.sigma!r}, bound {cert.bound}, "
                f"n = {cert.n}, α = {cert.alpha!r}; it is wrong only if that certificate is, which has "
                f"probability at most α. Each entry can be wrong with probability α, all entries hold at "
                f"once with probability at least 1 − α·(entries), and a query chosen after probing the "
                f"memory can aim at the wrong ones.")
        elif where == "selector":
            sel = cert.selector
            claim = (
                f"With probability at least {level} over this job's noise, the σ selector predicts {ball}: its "
                f"estimator, smoothed at σ_e = {sel.sigma_e!r}, chooses σ = {cert.sigma!r} everywhere within "
                f"{sel.radius_sigma!r} (bound at α/2 = {sel.alpha_sigma!r}), and the classifier smoothed at that σ "
                f"predicts the class within {sel.radius_class!r} (bound at α/2 = {sel.alpha_class!r}); the radius "
                f"is the smaller. The selector needs no memory: its answers never depend on earlier ones.")
        elif where == "per_sigma":
            claim = (
                f"With probability at least {level} over this job's noise, the classifier smoothed with "
                f"Gaussian noise at σ = {cert.sigma!r}, the σ searched for this input, predicts {ball}. The "
                f"memory was off: this says nothing about the service's classifier with per-input σ at "
                f"other inputs, and two such certificates may contradict each other.")
        else:
            claim = (
                f"With probability at least {level} over this job's noise, the classifier smoothed with "
                f"Gaussian noise at σ = {cert.sigma!r} predicts {ball}.")
    if seed_source == "caller":
        claim += (" The noise seed was chosen by the caller: if it was picked after seeing results, this "
                  "certificate guarantees nothing; it reproduces a run, it does not certify one.")
    return {"scope": where, "statement": claim}
