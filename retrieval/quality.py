"""Match quality of a hit: the probability that it is a close match, from a bundle's calibration.

A hit is a close match of a sketch when it is the image the sketch was drawn from, or when its
ground-truth mask agrees with that image's (DICE >= `close_dice` percent, recorded in the file).
A close match needs a sketch of the archive's anatomy, so the probability is a product:

    quality = P(in domain | the sketch) x P(close | in domain, the hit's features)

both logistic models fitted on validation queries by `python -m retrieval.calibrate fit` (see that
module), which also chooses `threshold`: a search whose best hit's quality is below it says
NO_CLOSE_MATCH. The first factor (`DomainGate`) reads the sketch-domain classifier's logit
(`generation.domain`), and is 1 where the bundle has no classifier; the second reads HIT_FEATURES.
Fitted as one logistic model of all five features, the domain logit got a small weight (it cannot
explain why most hits of in-domain sketches are not close), and fewer out-of-domain sketches were
flagged (docs/RESULTS.md).

Features, all recomputed from the query's and the hit's search vectors and the DICE re-ranking,
so they do not depend on how the final score orders the hits:
    field   cosine of the two sketch fields (the first part of the vector)
    code    cosine of the two E codes (offsets from E's mean code)
    image   cosine of C's embeddings (of x_hat, and of the archive image)
    dice    DICE / 100 of S(x_hat) and the hit's stored masks (absent with --no-rerank)
    domain  the sketch-domain classifier's logit of the query sketch, clipped to +-DOMAIN_CLIP, the
            same for every hit of a search: whether the sketch depicts the archive's anatomy at all
            (absent where the bundle has no domain.safetensors); read by the DomainGate only

BUNDLE/calibration.json is not a network file, so it is no part of the bundle id; it records the
bundle id it was fitted for (and the sha256 of domain.safetensors, which is no part of the bundle
id either), and one fitted for other weights is refused when loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from generation.checkpoints import atomic_write
from generation.errors import InputError
from generation.images import file_sha256

CALIBRATION_FILE = "calibration.json"
FORMAT = "sketch2medi-calibration"
FORMAT_VERSION = 2  # 1: "domain" was one of the hit model's features (refused: fit again)
FEATURES = ("field", "code", "image", "dice", "domain")
HIT_FEATURES = FEATURES[:4]  # those P(close | in domain) may use
DOMAIN_CLIP = 8.0  # logits beyond this say no more (and a few extreme ones would steer the gate's fit)
NO_CLOSE_MATCH = "no close match"
DOMAIN_FILE = "domain.safetensors"


def no_close_match_notice(best: float, threshold: float) -> str:
    """The line a search says above its results when its best hit is below the threshold."""
    return (f"{NO_CLOSE_MATCH}: the best result's match quality {best:.3f} is below {threshold:.3f}; "
            f"the results are the nearest archive images, not images like the sketch")


def hit_features(query: np.ndarray, hits: np.ndarray, dice: np.ndarray | None, sizes: tuple[int, int, int],
                 domain: float | None = None) -> np.ndarray:
    """query (D,) and hits (n, D) search vectors, dice (n,) percent or None, the query sketch's
    domain logit or None -> (n, len(FEATURES)) float64.

    sizes: the lengths of the vector's three parts (field, code, embedding). A part of weight 0 in
    the vector recipe, DICE without re-ranking, or no domain logit gives NaN."""
    assert query.ndim == 1 and hits.ndim == 2 and hits.shape[1] == query.shape[0] == sum(sizes), (query.shape, hits.shape, sizes)
    columns, start = [], 0
    for size in sizes:
        q, h = query[start : start + size].astype(np.float64), hits[:, start : start + size].astype(np.float64)
        norms = np.linalg.norm(q) * np.linalg.norm(h, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            columns.append(np.where(norms > 0, h @ q / norms, np.nan))
        start += size
    columns.append(np.full(len(hits), np.nan) if dice is None else np.asarray(dice, np.float64) / 100)
    columns.append(np.full(len(hits), np.nan if domain is None else float(np.clip(domain, -DOMAIN_CLIP, DOMAIN_CLIP))))
    return np.stack(columns, axis=1)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


@dataclass
class DomainGate:
    """P(in domain) = sigmoid(bias + weight * the clipped domain logit), for the classifier whose
    file has this sha256."""

    weight: float
    bias: float
    sha256: str

    def probability(self, logits: np.ndarray) -> np.ndarray:
        return sigmoid(self.bias + self.weight * logits)


@dataclass
class Calibration:
    """quality = gate(domain) x sigmoid(bias + weights . (features - mean) / scale); below
    `threshold` for the best hit, a search has no close match."""

    bundle_id: str
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float
    threshold: float
    close_dice: float
    fitted_on: dict = field(default_factory=dict)
    # The HIT_FEATURES the hit model uses, in their order: those the fitting queries' vectors have
    # (a part of weight 0 in the vector recipe is left out).
    features: tuple[str, ...] = HIT_FEATURES
    domain: DomainGate | None = None  # None: the bundle has no sketch-domain classifier

    def __post_init__(self) -> None:
        assert set(self.features) <= set(HIT_FEATURES), self.features

    def quality(self, features: np.ndarray) -> np.ndarray | None:
        """(n, len(FEATURES)) -> (n,) probabilities in [0, 1]; None when a feature it uses is missing (NaN)."""
        assert features.ndim == 2 and features.shape[1] == len(FEATURES), features.shape
        used = features[:, [FEATURES.index(name) for name in self.features]]
        domain = features[:, FEATURES.index("domain")]
        if np.isnan(used).any() or (self.domain is not None and np.isnan(domain).any()):
            return None
        quality = sigmoid(self.bias + ((used - self.mean) / self.scale) @ self.weights)
        return quality if self.domain is None else quality * self.domain.probability(domain)

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "bundle_id": self.bundle_id, "features": list(self.features),
                "mean": self.mean.tolist(), "scale": self.scale.tolist(), "weights": self.weights.tolist(), "bias": self.bias,
                "domain": None if self.domain is None else asdict(self.domain),
                "threshold": self.threshold, "close_dice": self.close_dice, "fitted_on": self.fitted_on}

    def save(self, bundle: str | Path) -> Path:
        path = Path(bundle) / CALIBRATION_FILE
        atomic_write(path, lambda p: p.write_text(json.dumps(self.to_json(), indent=1)))
        return path


def load_calibration(bundle: str | Path, bundle_id: str) -> Calibration | None:
    """BUNDLE/calibration.json; None when there is none. Refused (InputError) when damaged, fitted
    for other weights than `bundle_id`, or fitted with another domain.safetensors than the bundle's."""
    path = Path(bundle) / CALIBRATION_FILE
    if not path.is_file():
        return None
    refit = f"fit it again with `python -m retrieval.calibrate fit --bundle {bundle} ...`, or delete it"
    try:
        data = json.loads(path.read_text())
        used = data.get("features")
        if data.get("format") == FORMAT and data.get("format_version") == 1 and isinstance(used, list) and "domain" in used:
            raise InputError(f"{path}: fitted by an earlier version, with the domain logit as a hit feature; {refit}")
        if (data.get("format") != FORMAT or data.get("format_version", 0) > FORMAT_VERSION or not isinstance(used, list) or not used
                or used != [name for name in HIT_FEATURES if name in used]):
            raise InputError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} file with features among {', '.join(HIT_FEATURES)}; {refit}")
        mean, scale, weights = (np.array(data[key], np.float64).reshape(-1) for key in ("mean", "scale", "weights"))
        gate = data.get("domain")
        gate = None if gate is None else DomainGate(float(gate["weight"]), float(gate["bias"]), str(gate["sha256"]))
        calibration = Calibration(str(data["bundle_id"]), mean, scale, weights, float(data["bias"]), float(data["threshold"]),
                                  float(data["close_dice"]), dict(data.get("fitted_on") or {}), tuple(used), gate)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(f"{path}: damaged calibration ({error}); {refit}") from None
    if not all(len(v) == len(used) for v in (mean, scale, weights)) or not (scale > 0).all():
        raise InputError(f"{path}: damaged calibration (expected {len(used)} values, one per feature, positive scales); {refit}")
    if calibration.bundle_id != bundle_id:
        raise InputError(f"{path}: fitted for the bundle {calibration.bundle_id}, not for these weights ({bundle_id}); {refit}")
    if calibration.domain is not None:
        classifier = Path(bundle) / DOMAIN_FILE
        if not classifier.is_file() or file_sha256(classifier) != calibration.domain.sha256:
            raise InputError(f"{path}: fitted with another sketch-domain classifier than {classifier}; {refit}")
    return calibration
