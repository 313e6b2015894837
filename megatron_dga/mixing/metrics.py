"""TensorBoard/W&B tags of the mixing metrics; training/metrics.py merges them into its one table.

A strategy's ``metrics()`` returns its metrics.jsonl keys; a key listed here gets this tag (a scalar)
or tag prefix (a list, one tag per domain or basis); an unlisted one gets ``train/<key>``.
"""

from __future__ import annotations

from typing import Mapping

TENSORBOARD_TAGS: Mapping[str, str] = {
    "domain_weights": "mixing/weight",
    "domain_alignment": "mixing/alignment",
    "alignments": "mixing/alignment",
    "domain_grad_norms": "mixing/grad_norm",
    "specific_grad_norm": "mixing/specific_grad_norm",
    "basis_weights": "mixing/basis_weight",
    "dga_update": "mixing/updates",
    "dga_skipped_updates": "mixing/skipped_updates",
    "dga_fd_step": "mixing/fd_step",
    "dga_caps_binding": "mixing/caps_binding",
    "dga_caps_feasible": "mixing/caps_feasible",
    "dga_alignment_stderr": "mixing/alignment_stderr",
    "dga_sign_agreement": "mixing/sign_agreement",
    "dga_instep_domains": "mixing/instep_domains",
    "dga_instep_micro_batches": "mixing/instep_micro_batches",
    "odm_update": "mixing/updates",
    "odm_exploration": "mixing/odm_exploration",
    "odm_rewards": "mixing/odm_reward",
    "pike_update": "mixing/updates",
    "pike_skipped_updates": "mixing/skipped_updates",
    "pike_grad_sq": "mixing/pike_grad_sq",
    "pike_noise": "mixing/pike_noise",
    "pike_scores": "mixing/pike_score",
}
