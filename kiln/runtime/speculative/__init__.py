"""Speculative decoding: proposers, the verify step's sampler, and KV rollback.

A request that speculates carries `spec_token_ids`, k draft tokens proposed after its last
step. The scheduler gives it 1 + k query tokens (its last token and the drafts); the model
runner computes the target's logits at all k + 1 positions in one forward through the
ordinary paged attention path, and `verify` turns them into the tokens the request keeps:
the drafts up to the first rejection, then one token of the target's (a correction, or a
bonus when every draft was accepted). Rows past the first rejection come back as
PLACEHOLDER and are dropped.

Exactness. Greedy rows accept a draft iff it is the target's argmax, so the output is the
one of plain decoding. Sampled rows use rejection sampling (Leviathan et al. 2023, Chen et
al. 2023): draft d drawn from q is kept with probability min(1, p(d) / q(d)); otherwise the
token is drawn from max(0, p - q) renormalised; that makes every emitted token follow p.
An n-gram proposal is a q that is one-hot on d. All draws use counter-based noise of
(request seed, output position), so seeded requests are reproducible.

Rollback. Drafts never enter `request.token_ids` until accepted, and the scheduler counts
only the real token as computed: rejected drafts' K/V stay in the cache as garbage past
the request's length and are overwritten by its next step. `finish_step` trims the block
table to the tokens kept; nothing is copied.
"""

from kiln.runtime.speculative.config import METHODS, SpeculativeConfig
from kiln.runtime.speculative.proposers import DraftModel, ngram_propose
from kiln.runtime.speculative.speculator import Speculator, request_spec_stats
from kiln.runtime.speculative.verify import VerifyGraphs, verify

__all__ = ["METHODS", "DraftModel", "SpeculativeConfig", "Speculator", "VerifyGraphs",
           "ngram_propose", "request_spec_stats", "verify"]
