"""Outcome reward of the verl GRPO recipe: 1.0 when the completion's final answer matches the gold answer.

verl's own Math-Verify scorer (``verl.utils.reward_score.math_verify``, the checker the TRL recipe
uses through ``trl.rewards.accuracy_reward``), in the signature of verl's
``reward.custom_reward_function``. Needs ``pip install math-verify`` (in posttrain-probe's ``trl`` extra).
"""


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """1.0 if ``solution_str`` (the completion text) contains an answer equal to ``ground_truth``, else 0.0."""
    from verl.utils.reward_score.math_verify import compute_score as math_verify_score

    return float(math_verify_score(solution_str, str(ground_truth)))
