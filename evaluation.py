"""Evaluation as ncf.py runs it, and the metrics it reports.

The sampled protocol (the original's) ranks each test positive among its user's sampled
negatives; full ranking ranks it among every item the user has not trained on. Both run on the
test split and, where the data has one, the validation split. HR@k, NDCG@k and MRR come from
the positives' 0-based ranks. Every process scores a share of the users, then all exchange
every user's rank, so the figures are the same whatever the number of processes.
"""
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import cli
import dataloading
import scoring
from logger import METRIC_PREFIXES, metric_parts

def hit_rate_and_ndcg(ranks, k):
    """HR@k and NDCG@k from 0-based positive ranks: a hit when rank < k, gain 1/log2(rank+2)."""
    ranks = ranks.double()
    hits = ranks < k
    gains = torch.where(hits, 1.0 / torch.log2(ranks + 2.0), torch.zeros_like(ranks))
    return hits.double().mean().item(), gains.mean().item()


def ranking_metrics(ranks, topks):
    """HR@k and NDCG@k for each k in topks, and MRR, from 0-based positive ranks.

    Keys "hr@K", "ndcg@K", "mrr"; MRR is the mean of 1/(rank+1) over all users (no cut-off).
    """
    metrics = {}
    for k in topks:
        metrics[f"hr@{k}"], metrics[f"ndcg@{k}"] = hit_rate_and_ndcg(ranks, k)
    metrics["mrr"] = (1.0 / (ranks.double() + 1.0)).mean().item()
    return metrics


def check_cutoffs(args, nb_candidates):
    """Refuse a cut-off (-k, --report_topk) at or above the candidates each sampled positive is
    ranked among: every user would be a hit, HR 1.0, and --threshold met by nothing learnt."""
    for flag, cutoff in (("-k/--topk", args.topk),
                         *(("--report_topk", cutoff) for cutoff in args.report_topk)):
        if cutoff >= nb_candidates:
            raise cli.UserError(
                f"{flag} {cutoff}: each test positive is ranked among {nb_candidates} "
                f"candidates (its {nb_candidates - 1} test negatives and itself), so every user "
                f"would be a hit at {cutoff}; pass a cut-off below {nb_candidates}")


def reported(ranks, args, prefix=""):
    """HR@k and NDCG@k at -k; with --report_topk also at its cut-offs, and MRR. Keys as the
    log's: "hr@K", "ndcg@K", "mrr", after `prefix`."""
    cutoffs = list(dict.fromkeys([args.topk, *args.report_topk]))
    metrics = ranking_metrics(ranks, cutoffs)
    if not args.report_topk:
        del metrics["mrr"]
    return {prefix + key: value for key, value in metrics.items()}


def metrics_text(metrics):
    """stdout's `validation full HR@10 = 0.1234, ...` for log keys such as val_full_hr@10."""
    words = dict(METRIC_PREFIXES)
    parts = []
    for key, value in metrics.items():
        prefixes, metric = metric_parts(key)
        label = "".join(words[prefix] for prefix in prefixes)
        name, at, cutoff = metric.partition("@")
        parts.append(f"{label}{name.upper()}{at}{cutoff} = {value:.4f}")
    return ", ".join(parts)


def selected_metrics(history, epoch):
    """The metrics (keys as `reported` makes them) of `epoch`'s record in `history`; none
    before an epoch is selected (-1)."""
    record = next((record for record in history if record["epoch"] == epoch), {})
    return {key: value for key, value in record.items() if metric_parts(key)}


def positive_ranks(scores, items, duplicate_mask):
    """0-based rank of each row's positive (its last column) among the row's candidates.

    Repeats never count (the original gives their sigmoids -1), so each item is ranked once.
    The positive is ranked at the first column holding its item, and ties go to the earlier
    column, like a stable sort. NaN ranks last (see ranked_ahead).
    """
    first_column = (items == items[:, -1:]).int().argmax(dim=1, keepdim=True)
    positive_score = scores.gather(1, first_column)
    columns = torch.arange(items.shape[1], device=items.device)
    ahead = ranked_ahead(scores, positive_score, columns < first_column,
                         columns == first_column)
    return (ahead & ~duplicate_mask).sum(dim=1)


def ranked_ahead(scores, positive_scores, wins_ties, is_positive):
    """Bool: which candidates rank ahead of their row's positive.

    A higher score is ahead; an equal one only where wins_ties. NaN is the worst score: a NaN
    candidate is never ahead of a number, and a NaN positive is behind every other candidate,
    NaNs included. Plain comparisons, all false with NaN, would rank a NaN positive first, and
    a broken, all-NaN model would score HR 1.0 instead of 0.
    """
    ahead = (scores > positive_scores) | ((scores == positive_scores) & wins_ties)
    return torch.where(positive_scores.isnan(), ~is_positive, ahead)


def val_epoch(model, test_users, test_items, duplicate_mask, args, ctx):
    """HR@k, NDCG@k and validation loss over all test users (see sampled_ranks)."""
    ranks, validation_loss = sampled_ranks(model, test_users, test_items, duplicate_mask, args,
                                           ctx)
    return (*hit_rate_and_ndcg(ranks, args.topk), validation_loss)


def sampled_ranks(model, test_users, test_items, duplicate_mask, args, ctx):
    """Every user's positive rank and the validation loss; each rank scores a share of users.

    Scored in float32 whatever precision trained the model: float16 logits tie a negative with
    the positive where float32 tells them apart, and bfloat16 ties far more (the 2023 original
    evaluates in float32 too).

    The validation loss is the mean BCE-with-logits over the candidates, label 1 for the test
    positive; a repeat in a row counts once, as in the ranking. Ranks exchange every user's
    positive rank and loss sum (not partial sums), so the metrics are computed from the same
    ranks in the same order whatever the number of processes. The loss can differ in its last
    digits: where a share begins moves the batches' boundaries, and a matrix product's rounding
    may change with its number of rows.
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
    # autocast off: whatever a caller has on, the logits are float32's.
    with torch.inference_mode(), torch.autocast(ctx.device.type, enabled=False):
        # The same logits as model(user, item), with the item half of the first MLP layer
        # computed once per item instead of once per candidate: about twice the speed.
        scorer = scoring.FactoredScorer(model)
        for start in range(begin, end, rows_per_batch):
            stop = min(start + rows_per_batch, end)
            items = test_items[start:stop]
            # Ranked by logits: the order of the original's sigmoid scores, without the ties
            # sigmoid makes among large logits.
            scores = scorer.candidates(test_users[start:stop], items)
            ranks[start:stop] = positive_ranks(scores, items, duplicate_mask[start:stop])
            labels = (items == items[:, -1:]).float()
            losses = F.binary_cross_entropy_with_logits(scores, labels, reduction="none")
            loss_sums[start:stop] = losses.masked_fill(duplicate_mask[start:stop], 0.0).double(
            ).sum(dim=1)
    if ctx.world_size > 1:
        dist.all_reduce(loss_sums)
        dist.all_reduce(ranks)
    validation_loss = (loss_sums.sum() / (~duplicate_mask).sum()).item()
    return ranks, validation_loss


def sampled_evaluation(model, splits, args, ctx):
    """(metrics, test validation loss, candidates scored): the test split's under the
    original's keys, the validation split's (where there is one) under val_."""
    test = splits.test
    ranks, validation_loss = sampled_ranks(model, test.users, test.items, test.duplicate_mask,
                                           args, ctx)
    metrics = reported(ranks, args)
    candidates = test.items.numel()
    if splits.validation is not None:
        validation = splits.validation
        ranks = sampled_ranks(model, validation.users, validation.items,
                              validation.duplicate_mask, args, ctx)[0]
        metrics.update(reported(ranks, args, "val_"))
        candidates += validation.items.numel()
    return metrics, validation_loss, candidates


def full_ranking_evaluation(model, splits, args, ctx):
    """Full-ranking metrics under full_ (test) and val_full_ (validation).

    A validation positive is a known interaction when the test positive is ranked, so it is
    no candidate there, as training positives are not; the test positive, a later interaction,
    stays a candidate for the validation one.
    """
    known_users, known_items = splits.positives.users(), splits.positives.items
    metrics = {}
    if splits.validation is not None:
        validation = splits.validation
        metrics = full_ranking_metrics(model, known_users, known_items, validation, args, ctx)
        metrics = {f"val_full_{key}": value for key, value in metrics.items()}
        known_users = torch.cat((known_users, validation.users))
        known_items = torch.cat((known_items, validation.items[:, -1]))
    test = full_ranking_metrics(model, known_users, known_items, splits.test, args, ctx)
    return {**{f"full_{key}": value for key, value in test.items()}, **metrics}


def full_ranking_metrics(model, train_users, train_items, candidates, args, ctx):
    """The reported metrics (see reported) when each positive competes with all items its user
    has not trained on."""
    share = dataloading.share_bounds(len(candidates.users), ctx.world_size, ctx.rank)
    ranks = full_ranking_ranks(model, candidates.users, candidates.items[:, -1], train_users,
                               train_items, share=share)
    if ctx.world_size > 1:
        dist.all_reduce(ranks)
    return reported(ranks, args)


def full_ranking_seconds(model, splits, ctx, sample_users=1024):
    """Estimated seconds of one full-ranking evaluation on this process's share: its users
    (the validation split's too) times the seconds a user took on the first `sample_users`."""
    users = len(splits.test.users) + (len(splits.validation.users) if splits.validation else 0)
    share = dataloading.share_bounds(users, ctx.world_size, ctx.rank)
    sample = min(sample_users, len(splits.test.users))
    start = time.perf_counter()
    full_ranking_ranks(model, splits.test.users[:sample], splits.test.items[:sample, -1],
                       splits.positives.users(), splits.positives.items)
    return (time.perf_counter() - start) / sample * (share[1] - share[0])


def full_ranking_ranks(model, test_users, test_items, train_users, train_items, share=None,
                       chunk_pairs=None):
    """0-based rank of each test positive among all items its user has not trained on.

    test_users, test_items: [U] one positive per user (ncf.py's test_items[:, -1]).
    train_users, train_items: the training positives; a user's own are not candidates, except
    its test positive, which always is.
    Ties: an item with a score equal to the positive's counts ahead of it only when its item id
    is lower, the rule positive_ranks applies to columns; NaN ranks last, as
    there. Scores are logits, not sigmoids as in the sampled protocol: the order is
    the same, without the ties that float32 sigmoid rounding creates among large logits.
    share: (begin, end) rows of the test users to rank here; other rows are 0, so the [U] tensors
    of all processes add up (all-reduce, sum) to every user's rank.
    model: a NeuMF, or a scorer standing in for one (baselines.py): a callable users ->
    [len(users), nb_items] scores, with attributes nb_users, nb_items, device and chunk_pairs.
    Returns int64 [U], on the model's device, ready for hit_rate_and_ndcg(ranks, k).
    """
    nb_test = len(test_users)
    begin, end = share if share is not None else (0, nb_test)
    if not 0 <= begin <= end <= nb_test:
        raise ValueError(f"share ({begin}, {end}) is not inside the {nb_test} test users")
    if isinstance(model, torch.nn.Module):
        scorer = scoring.FactoredScorer(model, chunk_pairs)
        device = scorer.mf_items.device
    else:
        scorer, device = model, model.device
    nb_items = scorer.nb_items
    for name, ids, limit in (("test_users", test_users, scorer.nb_users),
                             ("train_users", train_users, scorer.nb_users),
                             ("test_items", test_items, nb_items),
                             ("train_items", train_items, nb_items)):
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= limit):
            raise ValueError(f"{name} holds ids outside the model's [0, {limit})")
    trained = scoring.TrainingItems(train_users.to(device), train_items.to(device),
                                    scorer.nb_users)
    test_users = test_users.to(device, torch.int64)
    test_items = test_items.to(device, torch.int64)
    ranks = torch.zeros(nb_test, dtype=torch.int64, device=device)
    item_ids = torch.arange(nb_items, device=device)
    step = scoring.users_per_batch(nb_items, scorer.chunk_pairs)
    with torch.inference_mode():
        for start in range(begin, end, step):
            stop = min(start + step, end)
            users, positives = test_users[start:stop], test_items[start:stop, None]
            scores = scorer(users)
            positive_scores = scores.gather(1, positives)
            ahead = ranked_ahead(scores, positive_scores, item_ids < positives,
                                             item_ids == positives)
            ahead &= ~trained.mask(users, nb_items)
            ranks[start:stop] = ahead.sum(dim=1)
    return ranks
