"""`speedasr tokenizer train --cuts CUTS --out DIR`: sentencepiece on the train transcripts."""

from __future__ import annotations

import argparse

from speedasr.data.tokenizer import Tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cuts", required=True, help="lhotse cutset (jsonl.gz) with transcripts")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=256, help="incl. special tokens")
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")


def run(args: argparse.Namespace) -> int:
    from speedasr.data.manifests import load_cuts

    cuts = load_cuts(args.cuts)
    texts, languages = [], {"en"}
    for cut in cuts:
        for sup in cut.supervisions:
            if sup.text:
                texts.append(sup.text)
            if sup.language:
                languages.add(sup.language)
    tok = Tokenizer.train(
        texts, args.out, vocab_size=args.vocab_size, model_type=args.model_type,
        languages=languages,
    )  # fmt: skip
    print(
        f"tokenizer: {tok.vocab_size} tokens ({args.model_type}) from {len(texts)} transcripts, "
        f"languages {', '.join(tok.languages)} -> {args.out}"
    )
    return 0
