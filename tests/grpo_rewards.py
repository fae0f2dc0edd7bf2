"""A reward for tests whose rollouts come from random weights (which never hit the default rewards, so every
group's rewards are equal and nothing moves): longer replies score more. Used as tests.grpo_rewards.length."""


def length(prompt: str, completion: str, answer: str) -> float:
    return len(completion) / 100
