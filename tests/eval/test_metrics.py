"""eval.metrics / eval.prompts on hand-made scores with known answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

from eval import metrics
from eval.evaluators.retrieval import (caption_owners, image_image_recalls, same_text_positive, text_ids,
                                      text_image_recalls)
from eval.prompts import class_prompts, ensemble, fill_template


def test_topk_known_answers():
    scores = torch.tensor([
        [0.9, 0.1, 0.0, 0.0],   # true 0: rank 0
        [0.5, 0.4, 0.3, 0.2],   # true 2: rank 2
        [0.1, 0.2, 0.3, 0.4],   # true 0: rank 3
    ])
    targets = torch.tensor([0, 2, 0])
    assert metrics.class_ranks(scores, targets).tolist() == [0, 2, 3]
    acc = metrics.topk_accuracy(scores, targets, [1, 2, 3, 4, 10])
    assert acc == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 3: pytest.approx(2 / 3), 4: 1.0, 10: 1.0}


def test_ties_count_against_the_model():
    # true class tied with one wrong class at the top: not a top-1 hit, but a top-2 hit
    scores = torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.7, 0.7]])
    targets = torch.tensor([0, 2])
    assert metrics.class_ranks(scores, targets).tolist() == [1, 1]
    assert metrics.topk_accuracy(scores, targets, [1, 2]) == {1: 0.0, 2: 1.0}
    # predictions agree with top-1: the tie goes to the other class, deterministically
    assert metrics.predict(scores, targets).tolist() == [1, 1]
    # a constant (collapsed) model scores 0 at top-1 and 1.0 only when k >= number of classes
    const = torch.zeros(5, 3)
    y = torch.tensor([0, 1, 2, 0, 1])
    assert metrics.topk_accuracy(const, y, [1, 2, 3]) == {1: 0.0, 2: 0.0, 3: 1.0}


def test_k_larger_than_classes_is_one():
    scores = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(1))
    assert metrics.topk_accuracy(scores, y, [3, 5, 10]) == {3: 1.0, 5: 1.0, 10: 1.0}


def test_classification_metrics_agree_with_sklearn():
    g = torch.Generator().manual_seed(0)
    n, c = 300, 7
    scores = torch.randn(n, c, generator=g)
    y = torch.randint(0, c - 1, (n,), generator=g)  # class 6 never occurs: sklearn edge case
    pred = metrics.predict(scores, y)
    assert torch.equal(pred, scores.argmax(1))  # no ties in continuous random scores
    cm = metrics.confusion_matrix(pred, y, c)
    assert cm.tolist() == skm.confusion_matrix(y, pred, labels=list(range(c))).tolist()
    acc1 = metrics.topk_accuracy(scores, y, [1])[1]
    assert acc1 == pytest.approx(skm.accuracy_score(y, pred))
    assert metrics.weighted_f1(cm) == pytest.approx(skm.f1_score(y, pred, average="weighted", zero_division=0))
    present = sorted(set(y.tolist()))
    assert metrics.mean_per_class_recall(cm) == pytest.approx(
        skm.recall_score(y, pred, labels=present, average="macro", zero_division=0))
    assert metrics.topk_accuracy(scores, y, [3])[3] == pytest.approx(
        skm.top_k_accuracy_score(y, scores.numpy(), k=3, labels=list(range(c))))


def test_retrieval_with_several_captions_per_image():
    # 3 images; image 0 has captions 0,1; image 1 has caption 2; image 2 has captions 3,4,5
    owners = torch.tensor([0, 0, 1, 2, 2, 2])
    sim = torch.tensor([
        # c0   c1   c2   c3   c4   c5
        [0.1, 0.8, 0.9, 0.0, 0.0, 0.0],   # img0: best own caption c1 (0.8) beaten by c2 -> rank 1
        [0.0, 0.0, 0.2, 0.5, 0.3, 0.3],   # img1: own c2 beaten by c3, c4, c5 -> rank 3
        [0.0, 0.0, 0.0, 0.1, 0.6, 0.2],   # img2: own c4 on top -> rank 0
    ])
    positive = owners[None, :] == torch.arange(3)[:, None]
    assert metrics.retrieval_ranks(sim, positive).tolist() == [1, 3, 0]
    # text -> image: each caption has one image
    assert metrics.retrieval_ranks(sim.T, positive.T).tolist() == [0, 0, 1, 1, 0, 1]


def test_text_image_recalls_and_mean():
    # identity-like features: caption j of image i is image i's vector (+ a little noise)
    img = F.normalize(torch.eye(4), dim=-1)
    texts, owners, with_caps = caption_owners([["a", "b"], ["c"], ["d", " ", "e"], ["f"]])
    assert texts == ["a", "b", "c", "d", "e", "f"] and with_caps == [0, 1, 2, 3]
    txt = img[owners]
    r = text_image_recalls(img, txt, owners, [1, 5])
    assert r["image_retrieval_recall@1"] == 1.0 and r["text_retrieval_recall@1"] == 1.0
    assert r["mean_recall"] == 1.0
    # swap image 0's and 1's texts: those two queries now miss at 1 (in both directions)
    txt2 = img[torch.tensor([1, 1, 0, 2, 2, 3])]
    r2 = text_image_recalls(img, txt2, owners, [1, 5])
    assert r2["text_retrieval_recall@1"] == pytest.approx(2 / 4)
    assert r2["image_retrieval_recall@1"] == pytest.approx(3 / 6)
    assert r2["image_retrieval_recall@5"] == 1.0
    # image 1's own caption scores 0 and ties with three zero-scoring wrong captions while two
    # wrong ones score 1: pessimistic rank 5, a miss even at k=5
    assert r2["text_retrieval_recall@5"] == pytest.approx(3 / 4)
    assert r2["mean_recall"] == pytest.approx((0.5 + 1 + 0.5 + 0.75) / 4)


def test_caption_text_ids_strip_surrounding_whitespace_only():
    assert text_ids(["a field.", " a field. ", "A field.", "a  field.", "a field."]).tolist() == [0, 0, 1, 2, 0]


def test_dedup_recalls_count_an_identical_caption_of_another_image_as_right():
    # images 0 and 1 share the caption "a field." word for word; identical texts have identical
    # features, so the two copies always tie, and the strict metric's pessimistic tie counts the
    # other image's copy as a wrong answer ranked above the right one
    img = torch.eye(3)
    texts, owners, _ = caption_owners([["a field.", "a river."], ["a field. ", "a road."], ["a lake."]])
    e = torch.eye(3)
    txt = torch.stack([e[0], e[2], e[0], e[1], e[2]])  # "a river." looks like image 2
    # sim rows = images, columns = captions c0..c4:
    #   img0 [1, 0, 1, 0, 0]; img1 [0, 0, 0, 1, 0]; img2 [0, 1, 0, 0, 1]
    ids = text_ids(texts)
    assert ids.tolist() == [0, 1, 0, 2, 3]
    assert same_text_positive(owners, ids, 3).tolist() == [
        [True, True, True, False, False],    # img0: its own c0, c1 and c2 (the same text as c0)
        [True, False, True, True, False],    # img1: c0 (the same text as its c2), c2, c3
        [False, False, False, False, True]]  # img2: c4
    r = text_image_recalls(img, txt, owners, [1, 2], ids=ids)
    # strict image->text: img0's own c0 ties with img1's c2 -> rank 1; img1 rank 0;
    # img2's c4 ties with img0's c1 -> rank 1.  R@1 = 1/3, R@2 = 3/3
    assert (r["text_retrieval_recall@1"], r["text_retrieval_recall@2"]) == (pytest.approx(1 / 3), 1.0)
    # dedup: c2 counts for img0, so img0 is a hit; img2 still misses (c1 is another text)
    assert (r["text_retrieval_recall@1_dedup"], r["text_retrieval_recall@2_dedup"]) == (pytest.approx(2 / 3), 1.0)
    # strict text->image: c2 (of img1) ranks img0 first and ties img2 with img1 -> rank 2;
    # c1 ranks img2 first, ties img1 -> rank 2; c0, c3, c4 rank 0.  R@1 = R@2 = 3/5
    assert r["image_retrieval_recall@1"] == pytest.approx(3 / 5) == r["image_retrieval_recall@2"]
    # dedup: img0 holds the text of c2 too -> c2 is a hit; c1 still misses.  R@1 = R@2 = 4/5
    assert r["image_retrieval_recall@1_dedup"] == pytest.approx(4 / 5) == r["image_retrieval_recall@2_dedup"]
    assert r["mean_recall"] == pytest.approx((3 / 5 + 3 / 5 + 1 / 3 + 1) / 4)  # 19/30
    assert r["mean_recall_dedup"] == pytest.approx((4 / 5 + 4 / 5 + 2 / 3 + 1) / 4)  # 49/60


def test_dedup_recalls_equal_the_strict_ones_without_duplicate_captions():
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(7, 8, generator=gen), dim=-1)
    caps = [[f"image {i} caption {j}" for j in range(1 + i % 3)] for i in range(7)]
    texts, owners, _ = caption_owners(caps)
    txt = F.normalize(img[owners] + torch.randn(len(texts), 8, generator=gen), dim=-1)
    r = text_image_recalls(img, txt, owners, [1, 2, 5], ids=text_ids(texts))
    strict = {k: v for k, v in r.items() if not k.endswith("_dedup")}
    assert len(strict) == 7 and 0 < strict["mean_recall"] < 1  # not trivially all hits or misses
    assert r == {**strict, **{f"{k}_dedup": v for k, v in strict.items()}}
    assert text_image_recalls(img, txt, owners, [1, 2, 5]) == strict  # no ids: strict metrics only


def test_image_image_leave_one_out():
    feats = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]]), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2])  # class 2 has no peer: not a query
    r, lonely = image_image_recalls(feats, labels, [1])
    assert lonely == 1 and r["image_image_recall@1"] == 1.0
    labels_bad = torch.tensor([0, 1, 0, 1, 2])  # nearest neighbours are now the other class
    r, _ = image_image_recalls(feats, labels_bad, [1, 3, 4])
    # queries 0 and 2 have their peer at rank 3 (behind the other class and the lonely image 4)
    assert (r["image_image_recall@1"], r["image_image_recall@3"], r["image_image_recall@4"]) == (0.0, 0.5, 1.0)


def test_query_without_positive_is_an_error():
    with pytest.raises(ValueError, match="query 1"):
        metrics.retrieval_ranks(torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]))


def test_prompt_ensembling_math():
    assert fill_template("a photo of {}.", "x") == "a photo of x." == fill_template("a photo of {c}.", "x")
    with pytest.raises(ValueError):
        fill_template("no placeholder", "x")
    assert class_prompts(["a", "b"], ["{}1", "{}2"]) == ["a1", "a2", "b1", "b2"]
    # class 0: prompts (3,4) and (0,2) -> normalized (0.6,0.8),(0,1) -> mean (0.3,0.9) -> renormalized
    feats = torch.tensor([[3.0, 4.0], [0.0, 2.0], [5.0, 0.0], [1.0, 0.0]])
    w = ensemble(feats, 2)
    expect0 = torch.tensor([0.3, 0.9]) / torch.tensor([0.3, 0.9]).norm()
    assert torch.allclose(w[0], expect0) and torch.allclose(w[1], torch.tensor([1.0, 0.0]))
    # unequal norms do not weight the mean: scaling a prompt's feature changes nothing
    assert torch.allclose(ensemble(feats * torch.tensor([[10.0], [1.0], [1.0], [3.0]]), 2), w)
    with pytest.raises(ValueError):
        ensemble(feats[:3], 2)
