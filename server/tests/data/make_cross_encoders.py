"""Writes the tiny random BERT cross-encoder and sequence classifier the rerank and
classification tests load, with what sentence-transformers and transformers answer for them.

Run with the benchmark environment (it has torch, transformers and sentence-transformers):
    .venv-bench/bin/python server/tests/data/make_cross_encoders.py
The outputs are checked in; the tests only read them.
"""
import json
import os

import torch
from sentence_transformers import CrossEncoder
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ("the a cat dog sat on mat kubernetes gpu serves model fast slow weather paris is in what "
         "where how rain sun cold warm city river good bad movie great awful").split()
QUERY_DOCS = [
    ("where is the cat", ["the cat sat on the mat", "kubernetes serves a model", "the dog is in paris", "cat"]),
    ("gpu model", ["a gpu serves the model fast", "the weather is cold", "slow"]),
]
TEXTS = ["a great movie", "an awful movie in the rain", "the weather in paris is warm", "gpu"]


def tokenizer(directory):
    """A lower-casing WordPiece tokenizer with BERT's specials and pair template."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list("abcdefghijklmnopqrstuvwxyz")
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    tk = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tk.decoder = decoders.WordPiece()
    # Token types as BERT's own tokenizer gives them: a pair's second text is of type 1.
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]",
                                  model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    tok.save_pretrained(directory)
    return tok


def model(directory, labels, seed):
    os.makedirs(directory, exist_ok=True)
    tok = tokenizer(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    m = BertForSequenceClassification(config).eval()
    # Random init leaves the biases at zero, LayerNorm at one and the scores near 0.5: spread
    # every weight, so that a loader that skips or misplaces one is caught.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    m.save_pretrained(directory, safe_serialization=True)
    return m, tok


def main():
    rerank_dir = os.path.join(HERE, "tiny", "cross-encoder")
    model(rerank_dir, ["LABEL_0"], seed=1)
    ce = CrossEncoder(rerank_dir, device="cpu")
    cases = []
    for query, docs in QUERY_DOCS:
        scores = ce.predict([(query, d) for d in docs]).tolist()
        cases.append({"query": query, "documents": docs, "scores": scores})
    with open(os.path.join(rerank_dir, "reference.json"), "w") as f:
        json.dump({"generator": "sentence-transformers CrossEncoder.predict (sigmoid)", "cases": cases}, f, indent=1)

    classify_dir = os.path.join(HERE, "tiny", "classifier")
    m, tok = model(classify_dir, ["negative", "neutral", "positive"], seed=2)
    with torch.no_grad():
        probs = torch.softmax(m(**tok(TEXTS, return_tensors="pt", padding=True)).logits, -1).tolist()
    with open(os.path.join(classify_dir, "reference.json"), "w") as f:
        json.dump({"generator": "transformers BertForSequenceClassification, softmax",
                   "texts": TEXTS, "probs": probs}, f, indent=1)


if __name__ == "__main__":
    main()
