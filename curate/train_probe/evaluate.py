"""Zero-shot classification (class-name prompts) and image<->text retrieval recall on a labelled eval set.

The metric functions take precomputed L2-normalised embeddings, so they are tested on embeddings whose
answer is known; `evaluate_model` encodes the eval set with a model and calls them. `item_results` keeps
the per-item outcomes (was image i classified right, was its caption in the top 5), which the probe's
confidence intervals resample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from curate.train_probe.data import Samples, normalize, tokenize

TEMPLATES = ("a clip art of a {c}.", "a drawing of a {c}.", "an illustration of {c}.")  # the shipped clipart set
METRICS = ("zeroshot_balanced", "zeroshot_top1", "zeroshot_top5", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")
# per-item outcomes kept for resampling (0/1 per eval item, in eval order)
ITEMS = ("zs_correct", "i2t_hit5", "t2i_hit5")


def class_prompt_name(label: str) -> str:
    return label.replace("_", " ").strip()


def topk_accuracy(logits: Any, targets: Any, k: int) -> float:
    """Share of rows whose target is among the k highest logits (k is capped at the number of columns)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return float((top == targets.view(-1, 1)).any(dim=1).float().mean())


def balanced_accuracy(logits: Any, targets: Any) -> float:
    """Mean over classes of the per-class top-1 recall (mean per-class accuracy).

    On an imbalanced eval set a weak model that answers one class for everything scores that class's
    share in plain top-1, which swings from seed to seed with the class it happens to favour; here it
    scores 1/classes whatever the class, so the metric measures what was learnt.
    """
    pred = logits.argmax(dim=1)
    recalls = [float((pred[targets == c] == c).float().mean()) for c in targets.unique()]
    return sum(recalls) / len(recalls) if recalls else 0.0


def zero_shot(image_emb: Any, class_emb: Any, targets: Any) -> dict[str, float]:
    """Mean per-class, top-1 and top-5 accuracy of the nearest class embedding (rows L2-normalised)."""
    logits = image_emb @ class_emb.T
    return {"zeroshot_balanced": balanced_accuracy(logits, targets),
            "zeroshot_top1": topk_accuracy(logits, targets, 1), "zeroshot_top5": topk_accuracy(logits, targets, 5)}


def retrieval(image_emb: Any, text_emb: Any) -> dict[str, float]:
    """Recall@1/5 both ways for index-aligned pairs: image i's caption is text i."""
    import torch

    sim = image_emb @ text_emb.T
    target = torch.arange(sim.shape[0], device=sim.device)
    return {
        "i2t_r1": topk_accuracy(sim, target, 1), "i2t_r5": topk_accuracy(sim, target, 5),
        "t2i_r1": topk_accuracy(sim.T, target, 1), "t2i_r5": topk_accuracy(sim.T, target, 5),
    }


def encode_images(model: Any, images_u8: Any, batch_size: int, device: str) -> Any:
    import torch

    mean, std = model.visual.image_mean, model.visual.image_std
    out = []
    with torch.no_grad():
        for i in range(0, images_u8.shape[0], batch_size):
            x = normalize(images_u8[i:i + batch_size].to(device), mean, std)
            out.append(torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1))
    return torch.cat(out)


def encode_texts(model: Any, tokens: Any, batch_size: int, device: str) -> Any:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, tokens.shape[0], batch_size):
            out.append(torch.nn.functional.normalize(model.encode_text(tokens[i:i + batch_size].to(device)).float(),
                                                     dim=-1))
    return torch.cat(out)


def class_embeddings(model: Any, tokenizer: Any, classes: Sequence[str], device: str,
                     templates: Sequence[str] = TEMPLATES) -> Any:
    """One L2-normalised embedding per class: the mean of its prompt embeddings, renormalised."""
    import torch

    prompts = [t.format(c=class_prompt_name(c)) for c in classes for t in templates]
    emb = encode_texts(model, tokenize(tokenizer, prompts), 512, device)
    emb = emb.view(len(classes), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1)


def item_results(image_emb: Any, text_emb: Any, class_emb: Any, targets: Any) -> dict[str, list[int]]:
    """Per-item 0/1 outcomes: zero-shot top-1 right, caption in image's top 5, image in caption's top 5."""
    import torch

    sim = image_emb @ text_emb.T
    idx = torch.arange(sim.shape[0], device=sim.device).view(-1, 1)
    k = min(5, sim.shape[0])
    return {
        "zs_correct": (image_emb @ class_emb.T).argmax(dim=1).eq(targets).int().tolist(),
        "i2t_hit5": (sim.topk(k, dim=1).indices == idx).any(dim=1).int().tolist(),
        "t2i_hit5": (sim.T.topk(k, dim=1).indices == idx).any(dim=1).int().tolist(),
    }


def evaluate_model(model: Any, tokenizer: Any, eval_set: Samples, device: str, batch_size: int = 256,
                   templates: Sequence[str] = TEMPLATES, items: bool = False) -> dict[str, Any]:
    """All METRICS of `model` on `eval_set` (which must carry labels); with `items`, also the per-item
    outcomes under the key "items" (see item_results)."""
    import torch

    if eval_set.labels is None:
        raise ValueError("the eval set has no labels")
    was_training = model.training
    model.eval()
    try:
        classes = sorted(set(eval_set.labels))
        index = {c: i for i, c in enumerate(classes)}
        targets = torch.tensor([index[c] for c in eval_set.labels], device=device)
        img = encode_images(model, eval_set.images, batch_size, device)
        txt = encode_texts(model, eval_set.tokens, batch_size, device)
        cls = class_embeddings(model, tokenizer, classes, device, templates)
        metrics: dict[str, Any] = zero_shot(img, cls, targets)
        metrics.update(retrieval(img, txt))
        if items:
            metrics["items"] = item_results(img, txt, cls, targets)
    finally:
        model.train(was_training)
    return metrics


def chance_level(eval_set: Samples) -> dict[str, float]:
    """What a model that knows nothing scores (uniform guessing), for the report's reference row."""
    from collections import Counter

    counts = Counter(eval_set.labels or [])
    n_cls = len(counts)
    n = len(eval_set)
    return {
        # always answering the most common class: the bar for an imbalanced eval set
        "majority_top1": max(counts.values()) / n if counts else 0.0,
        "zeroshot_balanced": 1 / n_cls if n_cls else 0.0,
        "zeroshot_top1": 1 / n_cls if n_cls else 0.0, "zeroshot_top5": min(5, n_cls) / n_cls if n_cls else 0.0,
        "i2t_r1": 1 / n, "i2t_r5": min(5, n) / n, "t2i_r1": 1 / n, "t2i_r5": min(5, n) / n,
        "retrieval_r1": 1 / n, "retrieval_r5": min(5, n) / n,
    }


def with_derived(metrics: dict[str, Any]) -> dict[str, Any]:
    out = dict(metrics)
    if "i2t_r1" in out and "t2i_r1" in out:
        out["retrieval_r1"] = (out["i2t_r1"] + out["t2i_r1"]) / 2
    if "i2t_r5" in out and "t2i_r5" in out:
        out["retrieval_r5"] = (out["i2t_r5"] + out["t2i_r5"]) / 2
    return out
