"""Evaluation as ncf.py runs it: the sampled protocol (each positive among its user's sampled
negatives) and full ranking (among every item the user has not trained on), on the test split
and, where the data has one, the validation split; the metrics reported from the ranks.

Every process scores a share of the users, then all exchange every user's rank, so the figures
are the same whatever the number of processes.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

import dataloading
import scoring


def val_epoch(model, test_users, test_items, duplicate_mask, args, ctx):
    """HR@k, NDCG@k and validation loss over all test users (see sampled_ranks)."""
    ranks, validation_loss = sampled_ranks(model, test_users, test_items, duplicate_mask, args,
                                           ctx)
    return (*dataloading.hit_rate_and_ndcg(ranks, args.topk), validation_loss)


def sampled_ranks(model, test_users, test_items, duplicate_mask, args, ctx):
    """Every user's positive rank and the validation loss; each rank scores a share of users.

    The validation loss is the mean BCE-with-logits over the candidates, label 1 for the test
    positive; a repeat in a row counts once, as in the ranking. Ranks exchange every user's
    positive rank and loss sum (not partial sums), so the metrics are computed from the same
    ranks in the same order whatever the number of processes. The loss can differ in its last
    digits (2.6006801924776e-01 against ...1925853e-01 for 1 and 2 processes): where a share
    begins moves the batches' boundaries, and a matrix product's rounding may change with its
    number of rows.
    """
    model.eval()
    nb_users, nb_candidates = test_items.shape
    begin, end = dataloading.share_bounds(nb_users, ctx.world_size, ctx.rank)
    samples_per_batch = args.valid_batch_size
    if ctx.device.type == "cpu":
        samples_per_batch = min(samples_per_batch, dataloading.CPU_CHUNK)
    rows_per_batch = max(1, samples_per_batch // nb_candidates)
    ranks = torch.zeros(nb_users, dtype=torch.int64, device=ctx.device)
    loss_sums = torch.zeros(nb_users, dtype=torch.float64, device=ctx.device)
    # Not in bfloat16: its 8-bit mantissa ties logits that float32 and float16 tell apart.
    with torch.inference_mode(), torch.autocast(ctx.device.type, dtype=torch.float16,
                                                enabled=ctx.autocast_dtype == torch.float16):
        # The same logits as model(user, item), with the item half of the first MLP layer
        # computed once per item instead of once per candidate: about twice the speed.
        scorer = scoring.FactoredScorer(model)
        for start in range(begin, end, rows_per_batch):
            stop = min(start + rows_per_batch, end)
            items = test_items[start:stop]
            # Ranked by float32 logits: the order of the original's sigmoid scores, without
            # the ties sigmoid makes among large logits (every logit above ~8 is 1.0 in fp16).
            scores = scorer.candidates(test_users[start:stop], items).float()
            ranks[start:stop] = dataloading.positive_ranks(
                scores, items, duplicate_mask[start:stop])
            labels = (items == items[:, -1:]).float()
            losses = F.binary_cross_entropy_with_logits(scores, labels, reduction="none")
            loss_sums[start:stop] = losses.masked_fill(duplicate_mask[start:stop], 0.0).double(
            ).sum(dim=1)
    if ctx.world_size > 1:
        dist.all_reduce(loss_sums)
        dist.all_reduce(ranks)
    validation_loss = (loss_sums.sum() / (~duplicate_mask).sum()).item()
    return ranks, validation_loss


def full_ranking_epoch(model, train_users, train_items, test_users, test_items, args, ctx):
    """The reported metrics (see reported) when each positive competes with all items its user
    has not trained on."""
    share = dataloading.share_bounds(len(test_users), ctx.world_size, ctx.rank)
    ranks = scoring.full_ranking_ranks(model, test_users, test_items[:, -1], train_users,
                                       train_items, share=share)
    if ctx.world_size > 1:
        dist.all_reduce(ranks)
    return reported(ranks, args)


def reported(ranks, args, prefix=""):
    """HR@k and NDCG@k at -k; with --report_topk also at its cut-offs, and MRR. Keys as the
    log's: "hr@K", "ndcg@K", "mrr", after `prefix`.

    Computed from every user's rank on every process, so all processes get the same figures.
    """
    cutoffs = list(dict.fromkeys([args.topk, *args.report_topk]))
    metrics = dataloading.ranking_metrics(ranks, cutoffs)
    if not args.report_topk:
        del metrics["mrr"]
    return {prefix + key: value for key, value in metrics.items()}


# Log key prefixes and the words stdout says for them.
SPLIT_LABELS = (("val_", "validation "), ("full_", "full "))


def metrics_text(metrics):
    """stdout's `validation full HR@10 = 0.1234, ...` for log keys such as val_full_hr@10."""
    parts = []
    for key, value in metrics.items():
        label = ""
        for prefix, words in SPLIT_LABELS:
            if key.startswith(prefix):
                key, label = key.removeprefix(prefix), label + words
        name, at, cutoff = key.partition("@")
        parts.append(f"{label}{name.upper()}{at}{cutoff} = {value:.4f}")
    return ", ".join(parts)


def sampled_evaluation(model, test_data, validation_data, args, ctx):
    """(metrics, test validation loss, candidates scored): the test split's under the
    original's keys, the validation split's (where there is one) under val_."""
    ranks, validation_loss = sampled_ranks(model, *test_data, args, ctx)
    metrics = reported(ranks, args)
    candidates = test_data[1].numel()
    if validation_data is not None:
        metrics.update(reported(sampled_ranks(model, *validation_data, args, ctx)[0], args,
                                "val_"))
        candidates += validation_data[1].numel()
    return metrics, validation_loss, candidates


def full_ranking_evaluation(model, train_users, train_items, test_data, validation_data, args,
                            ctx):
    """Full-ranking metrics under full_ (test) and val_full_ (validation).

    A validation positive is a known interaction when the test positive is ranked, so it is
    no candidate there, as training positives are not; the test positive, a later interaction,
    stays a candidate for the validation one.
    """
    known_users, known_items = train_users, train_items
    metrics = {}
    if validation_data is not None:
        validation_users, validation_items = validation_data[:2]
        metrics = full_ranking_epoch(model, train_users, train_items, validation_users,
                                     validation_items, args, ctx)
        metrics = {f"val_full_{key}": value for key, value in metrics.items()}
        known_users = torch.cat((train_users, validation_users))
        known_items = torch.cat((train_items, validation_items[:, -1]))
    test = full_ranking_epoch(model, known_users, known_items, test_data[0], test_data[1], args,
                              ctx)
    return {**{f"full_{key}": value for key, value in test.items()}, **metrics}
