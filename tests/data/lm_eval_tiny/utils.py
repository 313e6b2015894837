"""tiny_chain's items, read from tiny_chain.jsonl beside this file (no network, no dataset cache).

The items (tests/test_evaluate.py::chain_items writes the same ones): 36 contexts of 6 tokens, 12
per domain of ``mock.domain_tables(3, 127, seed=0)`` (tests/synthetic.py's three domains over ids
0..126), each following its domain's successor table; the answer is the successor of the last
token in that domain, the wrong choices are tokens that succeed it in none of the three.
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def load_items(**kwargs):
    import datasets

    with open(os.path.join(HERE, "tiny_chain.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}
