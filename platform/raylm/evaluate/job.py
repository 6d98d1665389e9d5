"""`jobs/evaluate.py`: score a registry model on a dataset split with Ray Data batch inference;
metrics, calibration, slices, robustness and baselines in one report beside the model."""

from __future__ import annotations

import json
import time
from typing import Any, Optional, Sequence

import numpy as np

from raylm import config, registry, storage, tracking
from raylm.evaluate import baselines, infer, metrics, report
from raylm.data.versions import read_split, with_labels
from raylm.evaluate.config import HIGHER_IS_BETTER, EvaluateConfig

CLS_COMPARE = ["accuracy", "f1_macro", "f1_micro", "roc_auc_ovr", "ece"]
LM_COMPARE = ["perplexity", "bits_per_byte", "next_token_accuracy", "loss"]


def _model_conf(card: dict[str, Any]) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(card["uri"], "config.json")))


def _labels(card: dict[str, Any]) -> list[str]:
    if card.get("labels"):
        return list(card["labels"])
    id2label = _model_conf(card).get("id2label") or {}
    return [str(id2label[str(i)]) for i in range(len(id2label))]


def _window(cfg: EvaluateConfig, card: dict[str, Any], task: str) -> int:
    if cfg.max_length:
        return cfg.max_length
    trained = (card.get("config") or {}).get("model", {}).get("max_length")
    if task == "classification":
        return int(trained or 256)
    conf = _model_conf(card)
    return int(conf.get("max_position_embeddings") or conf.get("n_positions") or 1024)


class Evaluation:
    """One run: what is evaluated on which documents; `score(model_dir, ds)` for any model."""

    def __init__(self, cfg: EvaluateConfig):
        import ray

        from raylm.data import versions

        self.cfg = cfg
        try:
            self.card = registry.resolve(cfg.model, cfg.registry)
        except FileNotFoundError as e:
            raise config.ConfigError(f"model: {e}") from None
        try:
            self.m = versions.resolve(cfg.data.dataset, cfg.data.root)
        except FileNotFoundError as e:
            raise config.ConfigError(f"data.dataset: {e}") from None
        self.task = self.card.get("task", "causal_lm")
        split = cfg.data.split
        if not self.m["splits"][split]["documents"]:
            raise config.ConfigError(f"data.split: {self.m['id']} has no documents in its {split} split")
        fs, path = storage.arrow_fs(storage.join(self.m["uri"], "docs", split))
        ds = ray.data.read_parquet(path, filesystem=fs)
        names = ds.schema().names
        missing = [c for c in cfg.slices.columns if c not in names]
        if missing:
            raise config.ConfigError(f"slices.columns: {missing} are not columns of the docs view ({', '.join(names)})")
        cols = list(dict.fromkeys(["id", "text", "label", *cfg.slices.columns]))
        ds = ds.select_columns(cols)
        if cfg.data.limit:
            ds = ds.limit(cfg.data.limit)
        self.window = _window(cfg, self.card, self.task)
        self.left_out = 0
        if self.task == "classification":
            self.labels = _labels(self.card)
            known = set(self.labels)
            ds = ds.materialize()
            self.left_out = sum(x not in known for x in ds.select_columns(["label"]).to_pandas()["label"])
            ds = ds.map_batches(with_labels, fn_kwargs={"labels": self.labels}, batch_format="pyarrow",
                                batch_size=None)  # (a row-by-row `filter` calls Python per row)
        # conversations: each model renders them with its chat template and is scored on the answers;
        # preference pairs: on the chosen answers, and the rejected ones scored beside them; rated
        # answers (KTO): each answer, and how well its likelihood tells the good ones from the bad
        self.chat = self.task == "causal_lm" and self.m.get("format") in ("chat", "preference", "rated")
        self.pairs = self.task == "causal_lm" and self.m.get("format") == "preference"
        self.rated = self.task == "causal_lm" and self.m.get("format") == "rated"
        self.rejected = None
        if self.rated:
            ds = ds.map_batches(_rated, batch_format="pyarrow")
        if self.pairs:
            self.rejected = ds.map_batches(_side, fn_kwargs={"side": 1}, batch_format="pyarrow").materialize()
            ds = ds.map_batches(_side, fn_kwargs={"side": 0}, batch_format="pyarrow")
        self.ds = ds.materialize()
        self.local = cfg.compute.num_gpus == 0 and self.ds.count() <= cfg.compute.local_max_docs

    def score(self, model_dir: str, ds=None, window: Optional[int] = None):
        """A pandas frame of the documents with the model's outputs (`window`: another model's own).
        Preference pairs (the clean documents): `rejected_nll` too, the rejected answer's."""
        frame = infer.run_inference(ds if ds is not None else self.ds, self.task, model_dir, window or self.window,
                                    self.cfg, local=self.local, chat=self.chat).to_pandas()
        if self.chat and not frame["scored"].all():
            print(f"[evaluate] {int((~frame['scored']).sum())} conversation(s) left unscored: the chat template of "
                  f"{model_dir} cannot render them", flush=True)
        if self.pairs and ds is None:
            rejected = infer.run_inference(self.rejected, self.task, model_dir, window or self.window, self.cfg,
                                           local=self.local, chat=True).to_pandas()
            frame["rejected_nll"] = frame["id"].map(dict(zip(rejected["id"], rejected["nll"])))
        return frame

    def score_other(self, other: dict[str, Any]):
        """Another registry model on the same documents, cut as that model was trained (a baseline)."""
        return self.score(str(registry.local_path(other)), window=_window(self.cfg, other, self.task))

    def metrics_of(self, frame, mask=None) -> dict[str, Any]:
        f = frame if mask is None else frame[mask]
        if self.task == "classification":
            probs = np.stack(f["probs"].to_numpy()) if len(f) else np.zeros((0, len(self.labels)))
            y = np.array([self.labels.index(x) for x in f["label"]])
            return metrics.classification(probs, y, self.labels, self.cfg.calibration_bins)
        lm = f[f["desirable"].astype(bool)] if "desirable" in f else f  # rated answers: the good ones' likelihood
        out = metrics.language_model(lm["nll"].to_numpy(), lm["tokens"].to_numpy(), lm["correct"].to_numpy(),
                                     lm["bytes"].to_numpy())
        if "rejected_nll" in f:  # the share of pairs whose chosen answer the model finds likelier
            out["preference_accuracy"] = float((f["nll"] < f["rejected_nll"]).mean()) if len(f) else float("nan")
        if "desirable" in f:  # how well the answers' likelihood per token tells the good ones from the bad
            good = f["desirable"].to_numpy().astype(bool)
            out["rating_auc"] = float("nan")
            if good.any() and not good.all():
                from sklearn.metrics import roc_auc_score

                out["rating_auc"] = float(roc_auc_score(good, -f["nll"].to_numpy() / np.maximum(f["tokens"].to_numpy(), 1)))
        return out


def _rated(batch):
    """Rated answers' docs -> their conversations (the rating line left out), with `desirable`."""
    import pyarrow as pa

    from raylm import chat

    parsed = [chat.parse_rated(t) for t in batch.column("text").to_pylist()]
    batch = batch.set_column(batch.schema.get_field_index("text"), "text",
                             pa.array([chat.to_text(m) for m, _ in parsed], pa.string()))
    return batch.append_column("desirable", pa.array([g for _, g in parsed], pa.bool_()))


def _side(batch, side: int):
    """Preference pairs' docs -> the conversations that end with their chosen (0) or rejected (1) answer."""
    import pyarrow as pa

    from raylm import chat

    texts = [chat.to_text(chat.parse_pair(t)[side]) for t in batch.column("text").to_pylist()]
    return batch.set_column(batch.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))


def _shown(m: dict[str, Any], keys: Sequence[str]) -> str:
    """The named metrics that are numbers, at 4 decimals: 'accuracy 0.9599, f1_macro 0.9169'."""
    return ", ".join(f"{k} {m[k]:.4f}" for k in keys if isinstance(m.get(k), (int, float)))


def _baselines(ev: Evaluation, frame) -> dict[str, Any]:
    cfg, out = ev.cfg, {}
    if ev.task == "classification" and cfg.baselines.tfidf:
        tr = read_split(ev.m, "docs", "train", ["text", "label"]).to_pylist()
        tr = [r for r in tr if r["label"] in ev.labels]
        name = "tfidf + logistic regression"
        try:  # a tiny or one-label train split cannot fit it: say so, keep the rest of the report
            probs = baselines.tfidf_logreg([r["text"] or "" for r in tr], [ev.labels.index(r["label"]) for r in tr],
                                           [t or "" for t in frame["text"]], len(ev.labels))
        except ValueError as e:
            print(f"[evaluate] {name} baseline skipped: {e}", flush=True)
            out[name] = {"skipped": str(e), "metrics": {}}
        else:
            y = np.array([ev.labels.index(x) for x in frame["label"]])
            out[name] = {"metrics": metrics.classification(probs, y, ev.labels, cfg.calibration_bins)}
    if ev.chat and cfg.baselines.ngram:
        print("[evaluate] n-gram baseline skipped: it scores whole texts, and a chat dataset is scored on its "
              "answers", flush=True)
    elif ev.task == "causal_lm" and cfg.baselines.ngram:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(registry.local_path(ev.card)), local_files_only=True)
        train = [t or "" for t in read_split(ev.m, "docs", "train", ["text"]).column("text").to_pylist()]

        def enc(texts: list[str], cut: Optional[int] = None) -> list[list[int]]:
            return [ids[:cut] for ids in tok(texts, add_special_tokens=False)["input_ids"]]

        # fit on the whole train split; score the same tokens and windows the model was scored on
        scored = baselines.ngram_lm(cfg.baselines.ngram, len(tok), enc(train),
                                    enc([t or "" for t in frame["text"]], cfg.max_tokens_per_doc), ev.window)
        correct = np.zeros(len(frame))  # an n-gram guess is not scored for accuracy
        m = metrics.language_model(scored["nll"], scored["tokens"], correct, frame["bytes"].to_numpy())
        m.pop("next_token_accuracy", None)
        out[f"{cfg.baselines.ngram}-gram (interpolated, train split)"] = {"metrics": m}
    reference = (ev.card.get("preference") or {}).get("reference")
    if (ev.pairs or ev.rated) and reference:  # the model as it was before preference tuning, on the same pairs
        try:
            out[f"reference {reference}"] = {"metrics": ev.metrics_of(ev.score(reference))}
        except OSError as e:  # moved or deleted since: say so, keep the rest of the report
            print(f"[evaluate] reference baseline skipped: {reference} cannot be loaded ({e})", flush=True)
    if cfg.baselines.previous_versions:
        earlier = sorted((c for c in registry.list_models(cfg.registry)
                          if c["name"] == ev.card["name"] and c["version"] < ev.card["version"]),
                         key=lambda c: c["version"])[-cfg.baselines.previous_versions:]
        for c in earlier:
            out[c["id"]] = {"metrics": ev.metrics_of(ev.score_other(c))}
    return out


def _promote(ev: Evaluation, rep: dict[str, Any]) -> dict[str, Any]:
    """Move `promote.alias` to the evaluated model when it scores at least as well (by `min_delta`)
    as the model the alias points at, both scored here on the same documents. Returns what was
    decided and why; a model that loses leaves the alias where it was (not an error)."""
    p, card = ev.cfg.promote, ev.card
    metric = p.metric or rep["headline_metric"]
    higher = metric in HIGHER_IS_BETTER
    out: dict[str, Any] = {"alias": p.alias, "metric": metric, "higher_is_better": higher, "min_delta": p.min_delta,
                           "candidate": card["id"], "candidate_value": rep["metrics"].get(metric)}
    held = registry.alias_of(card["name"], p.alias, ev.cfg.registry)
    ref = f"{card['name']}@{p.alias}"
    if held is not None and held["version"] == card["version"]:
        return {**out, "promoted": False, "holder": card["id"], "reason": f"{ref} already points at {card['id']}"}
    value = out["candidate_value"]
    if value is None or not np.isfinite(value):
        return {**out, "promoted": False, "holder": held and held["id"],
                "reason": f"{metric} of {card['id']} is undefined on this split"}
    if held is None:
        reason = f"{ref} pointed nowhere; set to {card['id']} ({metric} {value:.4f})"
    else:
        try:
            holder = registry.resolve(held["id"], ev.cfg.registry)
        except FileNotFoundError:
            holder = None
        if holder is None:
            reason = f"{ref} pointed at {held['id']}, which is no longer in the registry; set to {card['id']}"
        else:
            scored = rep["baselines"].get(holder["id"])  # an earlier version scored as a baseline
            if scored is None:  # scored here, and listed with the baselines
                scored = rep["baselines"][holder["id"]] = {"metrics": ev.metrics_of(ev.score_other(holder))}
            hm = scored["metrics"]
            hv = hm.get(metric)
            out.update(holder=holder["id"], holder_value=hv)
            if hv is not None and np.isfinite(hv):
                gain = (value - hv) if higher else (hv - value)
                how = f"better by {gain:.4f}" if gain > 0 else f"worse by {-gain:.4f}" if gain < 0 else "as good"
                compared = f"{card['id']} {metric} {value:.4f} against {holder['id']} {hv:.4f}: {how}"
                if gain < p.min_delta:
                    needs = f"better by {p.min_delta}" if p.min_delta else "at least as good"
                    return {**out, "promoted": False,
                            "reason": f"{compared} (promotion needs {needs}); {ref} stays at {holder['id']}"}
                reason = compared
            else:
                reason = f"{metric} of {holder['id']} is undefined on this split; set to {card['id']}"
    now = registry.alias_of(card["name"], p.alias, ev.cfg.registry)
    if (now and now["version"]) != (held and held["version"]):  # moved by someone else while this job scored
        return {**out, "promoted": False, "reason": f"{ref} moved to {now and now['id']} while this job ran; "
                                                    "evaluate again to compare against it"}
    registry.set_alias(card["id"], p.alias, ev.cfg.registry,
                       reason=f"raylm evaluate on {ev.m['id']}:{ev.cfg.data.split}: {reason}")
    return {**out, "promoted": True, "reason": reason}


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    t0 = time.time()
    ev = Evaluation(cfg)
    card, m, split = ev.card, ev.m, cfg.data.split
    compare = CLS_COMPARE if ev.task == "classification" else LM_COMPARE + (
        ["preference_accuracy"] if ev.pairs else ["rating_auc"] if ev.rated else [])
    if cfg.promote:  # before any scoring
        if "name" not in card or "version" not in card:
            raise config.ConfigError(f"promote: {cfg.model} is a model directory, not a registry model; "
                                     "aliases belong to registry models (model: NAME or NAME@vN)")
        if cfg.promote.metric and cfg.promote.metric not in compare:
            raise config.ConfigError(f"promote.metric: {cfg.promote.metric!r} is not a metric of a {ev.task} model "
                                     f"({', '.join(compare)})")
    reads = ""
    if ev.task == "classification":
        trained = (card.get("config") or {}).get("model") or {}
        long_texts = trained.get("long_texts") or "truncate"
        reads = (f"; texts read in windows of {ev.window} tokens (at most {trained.get('max_windows') or 8}), "
                 "averaged" if long_texts == "windows" else f"; texts cut at {ev.window} tokens")
        temperature = (card.get("calibration") or {}).get("temperature")
        if temperature is not None:  # model.calibration: the head the export holds is already divided by it
            reads += f"; calibrated in training (temperature {temperature:.3f})"
    if ev.chat:
        reads = "; conversations rendered with the model's chat template, answers scored"
    if ev.pairs:
        reads = ("; preference pairs rendered with the model's chat template: the chosen answers scored, and "
                 "whether the model finds each chosen answer likelier than the rejected one")
    if ev.rated:
        reads = ("; rated answers rendered with the model's chat template: the answers rated good scored, and how "
                 "well the likelihood per token of every answer tells the good ones from the bad (rating_auc)")
    print(f"[evaluate] {card['id']} ({ev.task}) on {m['id']} {split}: {ev.ds.count()} documents, "
          f"{cfg.compute.actors} replica(s){reads}" + (f"; {ev.left_out} without a known label left out"
                                                        if ev.left_out else ""), flush=True)
    model_dir = str(registry.local_path(card))
    frame = ev.score(model_dir)
    headline = "accuracy" if ev.task == "classification" else "preference_accuracy" if ev.pairs \
        else "rating_auc" if ev.rated else "bits_per_byte"
    rep: dict[str, Any] = {"model": card["id"], "task": ev.task, "dataset": m["id"], "split": split,
                           "headline_metric": headline, "window": ev.window, "left_out": ev.left_out,
                           "compare_metrics": compare,
                           "metrics": ev.metrics_of(frame)}
    if ev.task == "classification":
        rep["labels"], rep["long_texts"], rep["temperature"] = ev.labels, long_texts, temperature
    print(f"[evaluate] {_shown(rep['metrics'], rep['compare_metrics'])}", flush=True)

    slice_metric = cfg.slices.metric or headline
    rep["slices"] = {}
    for col in cfg.slices.columns:
        groups = frame[col].tolist()
        s = metrics.slices(groups, lambda mask: ev.metrics_of(frame, mask), slice_metric, cfg.slices.max_gap,
                           cfg.slices.min_size)
        for g in s["groups"].values():  # keep the slice table small: no per-class or reliability detail
            for k in ("per_class", "reliability", "confusion"):
                g.pop(k, None)
        rep["slices"][col] = s
        if s["flagged"]:
            print(f"[evaluate] FLAG: {slice_metric} differs by {s['gap']:.4f} between {col}={s['best']} and "
                  f"{col}={s['worst']} (max_gap {cfg.slices.max_gap})", flush=True)

    if cfg.robustness:
        r = cfg.robustness
        # preference pairs: perturbed questions are scored on the chosen answers (bits per byte)
        robust = "bits_per_byte" if ev.pairs else headline
        rep["robustness"] = {"seed": r.seed, "metric": robust, "ops": {}}
        for op in r.ops:
            for strength in r.strengths_of(op):
                noisy = ev.ds.map_batches(infer.perturb_batch, fn_kwargs={"op": op, "strength": strength,
                                                                          "seed": r.seed, "chat": ev.chat},
                                          batch_format="pyarrow")
                mm = ev.metrics_of(ev.score(model_dir, noisy))
                for k in ("per_class", "reliability", "confusion"):
                    mm.pop(k, None)
                rep["robustness"]["ops"].setdefault(op, []).append({"strength": strength, "metrics": mm})
                clean, noisy_v = rep["metrics"].get(robust), mm.get(robust)
                change = f" ({noisy_v - clean:+.4f} from clean)" if None not in (clean, noisy_v) else ""
                print(f"[evaluate] robustness {op}@{strength}: {_shown(mm, [robust])}{change}", flush=True)

    rep["baselines"] = _baselines(ev, frame)
    for name, b in rep["baselines"].items():
        if b["metrics"]:
            print(f"[evaluate] baseline {name}: {_shown(b['metrics'], rep['compare_metrics'])}", flush=True)
    if cfg.promote:
        rep["promotion"] = _promote(ev, rep)
        print(f"[evaluate] {'PROMOTED' if rep['promotion']['promoted'] else 'not promoted'}: "
              f"{rep['promotion']['reason']}", flush=True)
    rep["seconds"] = time.time() - t0
    out = cfg.output or storage.join(card["uri"], "eval", f"{m['name']}-{m['version']}-{split}")
    rep["report"] = report.write(rep, out)
    headline_metrics = {k: rep["metrics"][k] for k in rep["compare_metrics"] if rep["metrics"].get(k) is not None}
    evaluation = {"dataset": m["id"], "split": split, "metrics": headline_metrics, "report": rep["report"],
                  "baselines": {name: {k: b["metrics"][k] for k in rep["compare_metrics"]
                                       if b["metrics"].get(k) is not None} for name, b in rep["baselines"].items()},
                  "flagged_slices": [c for c, s in rep["slices"].items() if s["flagged"]],
                  **({"promotion": rep["promotion"]} if "promotion" in rep else {})}
    card = {**card, "evaluations": {**card.get("evaluations", {}), f"{m['id']}:{split}": evaluation}}
    storage.write_json(storage.join(card["uri"], registry.CARD), card)
    print(f"[evaluate] report: {rep['report']}", flush=True)
    tracker = tracking.Tracker.start(cfg.tracking, "evaluate", f"{card['id']}@{m['id']}:{split}",
                                     cfg.model_dump(mode="json", exclude={"tracking"}),
                                     tags={"raylm.model": card["id"], "raylm.dataset": m["id"]})
    tracker.log_metrics({k: v for k, v in rep["metrics"].items() if k not in ("per_class", "reliability", "confusion")})
    tracker.log_metrics({f"baseline.{name}": b["metrics"] for name, b in rep["baselines"].items()})
    tracker.log_artifacts([out], "report")
    tracker.finish()
    rep["tracking"] = tracker.run_id
    return rep


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = config.job_argparser("Evaluate a registry model on a dataset split (raylm evaluate job).").parse_args(argv)
    cfg = config.load(EvaluateConfig, args.config, args.overrides)
    from raylm.runtime import init_ray

    init_ray(config=cfg)  # on several nodes: every local path it names must be shared
    rep = run(cfg)
    print("RAYLM_RESULT " + json.dumps({"model": rep["model"], "report": rep["report"],
                                        **({"promoted": rep["promotion"]["promoted"]} if "promotion" in rep else {}),
                                        "metrics": {k: v for k, v in rep["metrics"].items()
                                                    if isinstance(v, (int, float))}}), flush=True)
    return 0
