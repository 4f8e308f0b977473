"""Pure tensor math of the objectives: tensors in, tensors and a metrics dict out, no module state.

advantages   group_advantages, ADVANTAGE_SCALES (group | batch | none)
policy_loss  policy_loss (token/sequence ratio, clip-higher, dual clip, KL, TIS, entropy bonus), aggregate,
             loss_normalizer, LOSS_AGGREGATIONS (token_mean | seq_mean_token_mean | seq_mean_token_sum_norm),
             truncated_is_weights
kl           kl_estimate, KL_ESTIMATORS (k1 | k2 | k3)
logprobs     chunked_token_logprobs (never full-vocab logits for a batch), token_logprobs_from_logits,
             entropy_from_logits, entropy_metrics
sft          sft_loss (normalised over the whole optimizer step)
masking      masked_sum / masked_mean / masked_max / masked_min
Metrics are detached 0-dim tensors, so the hot loop never syncs with the device; call ``float()`` when logging.
"""

from stagewise.algorithms.advantages import ADVANTAGE_SCALES, group_advantages
from stagewise.algorithms.from_config import ALGORITHMS, PolicyLossSettings, check_algorithm_config
from stagewise.algorithms.kl import KL_ESTIMATORS, kl_estimate
from stagewise.algorithms.logprobs import (
    chunked_token_logprobs,
    entropy_from_logits,
    entropy_metrics,
    lm_head_logits,
    token_logprobs_from_logits,
)
from stagewise.algorithms.masking import masked_max, masked_mean, masked_min, masked_sum
from stagewise.algorithms.policy_loss import (
    LOSS_AGGREGATIONS,
    RATIO_LEVELS,
    aggregate,
    loss_normalizer,
    policy_loss,
    truncated_is_weights,
)
from stagewise.algorithms.sft import sft_loss

__all__ = [
    "ADVANTAGE_SCALES", "ALGORITHMS", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "RATIO_LEVELS",
    "aggregate", "check_algorithm_config", "chunked_token_logprobs", "entropy_from_logits", "entropy_metrics",
    "group_advantages", "kl_estimate", "lm_head_logits", "loss_normalizer", "masked_max", "masked_mean", "masked_min", "masked_sum",
    "policy_loss", "PolicyLossSettings", "sft_loss", "token_logprobs_from_logits", "truncated_is_weights",
]
