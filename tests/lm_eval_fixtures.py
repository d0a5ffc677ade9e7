"""Hand-written commonsense records in the LLM-Adapters formats of the eight sets, a byte-level
BPE tokenizer trained on them (joint encoding of context + continuation matters, as with real
tokenizers) and a tiny LLaMA on disk: shared by tests/test_loglik.py and tests/test_lm_eval.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as T

RECORDS = {
    "boolq": [
        ("Please answer the following question with true or false, question: is the sun a star?\n\n"
         "Answer format: true/false", "true"),
        ("Please answer the following question with true or false, question: can fish climb trees\n\n"
         "Answer format: true/false", "false"),
        ("Please answer the following question with true or false, question: is water wet?\n\n"
         "Answer format: true/false", "true"),
    ],
    "piqa": [
        ("Please choose the correct solution to the question: How do I cool tea?\n\nSolution1: Put it in the "
         "fridge.\n\nSolution2: Put it in the oven.\n\nAnswer format: solution1/solution2", "solution1"),
        ("Please choose the correct solution to the question: dresser\n\nSolution1: replace drawer with "
         "bobby pin\n\nSolution2: replace drawer with a new drawer\n\nAnswer format: solution1/solution2",
         "solution2"),
    ],
    "social_i_qa": [
        ("Please choose the correct answer to the question: Tracy didn't go home. What does Tracy need to do "
         "before this?\n\nAnswer1: make a plan Answer2: Go home Answer3: Find somewhere to go\n\n"
         "Answer format: answer1/answer2/answer3", "answer3"),
    ],
    "ARC-Easy": [
        ("Please choose the correct answer to the question: Which gas do plants take in: oxygen or carbon "
         "dioxide?\n\nAnswer1: oxygen Answer2: carbon dioxide Answer3: helium Answer4: neon\n\n"
         "Answer format: answer1/answer2/answer3/answer4", "answer2"),
        ("Please choose the correct answer to the question: What melts ice?\n\nAnswer1: heat Answer2: cold "
         "Answer3: dark\n\nAnswer format: answer1/answer2/answer3", "answer1"),
        ("Please choose the correct answer to the question: Which is a mammal?\n\nAnswer1: shark Answer2: "
         "trout Answer3: whale Answer4: eel Answer5: crab\n\nAnswer format: answer1/answer2/answer3/answer4/"
         "answer5", "answer3"),
    ],
    "ARC-Challenge": [
        ("Please choose the correct answer to the question: What do roots absorb?\n\nAnswer1: light Answer2: "
         "water Answer3: sound Answer4: heat\n\nAnswer format: answer1/answer2/answer3/answer4", "answer2"),
    ],
    "openbookqa": [
        ("Please choose the correct answer to the question: There is most likely going to be fog around:\n\n"
         "Answer1: a marsh Answer2: a desert Answer3: a volcano Answer4: a field\n\n"
         "Answer format: answer1/answer2/answer3/answer4", "answer1"),
    ],
    "hellaswag": [
        ("Please choose the correct ending to complete the given sentence: Roof shingle removal: A man is on a "
         "roof. he\n\nEnding1: is using wrap. Ending2: is ripping tiles off. Ending3: holds a cube. Ending4: "
         "starts pulling up roofing.\n\nAnswer format: ending1/ending2/ending3/ending4", "ending4"),
    ],
    "winogrande": [
        ("Please choose the correct answer to fill in the blank to complete the given sentence: Sarah was a "
         "better surgeon than Maria so _ always got the harder cases.\n\nOption1: Sarah Option2: Maria Answer "
         "format: option1/option2", "option1"),
        ("Please choose the correct answer to fill in the blank to complete the given sentence: The cup did "
         "not fit in the box because _ was too big.\n\nOption1: the cup Option2: the box Answer format: "
         "option1/option2", "option1"),
    ],
}  # fmt: skip


def records(task: str) -> list[dict]:
    return [
        {"instruction": i, "input": "", "output": f"the correct answer is {a}", "answer": a} for i, a in RECORDS[task]
    ]


def write_data(root: Path) -> Path:
    """A data directory laid out like ../shared/data holding the hand-written records."""
    for task in RECORDS:
        d = root / "test" / "commonsense" / task
        d.mkdir(parents=True, exist_ok=True)
        (d / "test.json").write_text(json.dumps(records(task)))
    return root


def bpe_tokenizer() -> T.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [i for recs in RECORDS.values() for i, _ in recs] * 3 + ["Question: Answer: Q: A: yes no"] * 5
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"]))
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_model_dir(path: Path) -> Path:
    """A tiny random LLaMA (fp32) and the BPE tokenizer, saved to `path`."""
    tok = bpe_tokenizer()
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    model = T.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked log-probabilities: options score differently
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
