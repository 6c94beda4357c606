"""A small synthetic chain batch through every rankloss loss: prints each loss and its metrics.

Three chains of ragged sizes; caption i of a chain is a token sequence scored by a random LM head; the
policy is the reference model plus a perturbation, so the rewards beta * (s - s_ref) are small and
mixed. Runs in a second on a CPU:

    python examples/chain_losses_demo.py
"""

from __future__ import annotations

import torch

import rankloss


def main() -> None:
    torch.manual_seed(0)
    chain_sizes = [4, 3, 6]  # C = 3 chains, S = 13 captions, best caption first in each chain
    S, T, D, V = sum(chain_sizes), 12, 32, 101
    labels = torch.randint(0, V, (S, T))
    labels[:, :3] = -100  # prompt positions are not scored
    labels[1, 9:] = -100  # padding
    lm_head = torch.randn(V, D) / D**0.5
    ref_hidden = torch.randn(S, T, D)
    hidden = (ref_hidden + 0.3 * torch.randn(S, T, D)).requires_grad_()

    ref_token_logps = rankloss.linear_token_logprobs(ref_hidden, lm_head, labels)
    ref_scores = rankloss.sequence_logprobs(ref_token_logps, labels)
    token_logps = rankloss.linear_token_logprobs(hidden, lm_head, labels)
    scores = rankloss.sequence_logprobs(token_logps, labels)
    num_tokens = (labels != -100).sum(-1)

    runs = {
        "plackett_luce": dict(loss="plackett_luce"),
        "plackett_luce top_k=2": dict(loss="plackett_luce", top_k=2),
        "dpo adjacent sigmoid": dict(loss="dpo", pairs="adjacent"),
        "dpo all hinge": dict(loss="dpo", pairs="all", dpo_loss_type="hinge"),
        "dpo best_rest ipo": dict(loss="dpo", pairs="best_rest", dpo_loss_type="ipo"),
        "lipo": dict(loss="lipo"),
        "plackett_luce + sft 0.5": dict(loss="plackett_luce", sft_weight=0.5, num_tokens=num_tokens),
    }
    header = ("loss", "value", "pair_acc", "top1", "tau", "margin", "|grad|")
    print("{:28s} {:>9s} {:>9s} {:>6s} {:>7s} {:>9s} {:>9s}".format(*header))
    for name, options in runs.items():
        out = rankloss.chain_loss(scores, chain_sizes, ref_scores, beta=0.5, **options)
        (grad,) = torch.autograd.grad(out.loss, hidden, retain_graph=True)
        m = out.metrics()
        print(
            f"{name:28s} {m['loss']:9.4f} {m['pairwise_accuracy']:9.3f} {m['top1_accuracy']:6.2f} "
            f"{m['kendall_tau']:7.3f} {m['neighbour_margin']:9.4f} {grad.norm():9.4f}"
        )
    out = rankloss.plackett_luce_loss(scores, chain_sizes, ref_scores, beta=0.5, reduction="none")
    print("per-chain Plackett-Luce losses:", [round(v, 4) for v in out.loss.tolist()])
    print("mean reward per chain position:", [round(v, 4) for v in out.reward_per_position.tolist()])


if __name__ == "__main__":
    main()
