"""The data of the shipped synthetic tasks: synthetic.jsonl beside this file, read without the Hugging Face hub.

A task YAML's `dataset_kwargs: {data_files: ...}` resolves against the folder `isoflop eval` runs in; these
tasks load their file through `custom_dataset` instead, so they work from anywhere.

Each row is {"context", "choices", "answer"} (the format `isoflop score` reads too): the context is a
document's topic token and first 3 tokens, the answer its next 3 tokens, and the 3 other choices the same
span of documents on other topics, so a model must have learnt the topic's chain, not only which tokens are
common. `python -m pipeline.use.lm_eval_tasks.local_data` writes the file again (same seed: the same file).
"""
import json
from pathlib import Path

DATA = Path(__file__).with_name("synthetic.jsonl")


def synthetic(**_metadata):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(DATA)})


def write_synthetic(path: Path = DATA, n: int = 50, seed: int = 3) -> None:
    import numpy as np

    from pipeline.data.synthetic import SyntheticLanguage

    language = SyntheticLanguage()
    rng = np.random.default_rng([0, seed])  # the corpus's train, val and tasks.jsonl use streams 0, 1, 2
    stream = language.sample(200_000, rng)
    documents = [d for d in np.split(stream, np.flatnonzero(stream == language.eos_id) + 1) if len(d) >= 8]
    own, pool = documents[:n], documents[n:]
    rows = []
    for doc in own:
        span = " ".join(map(str, doc[4:7]))
        others = list(dict.fromkeys(" ".join(map(str, d[4:7])) for d in pool if d[0] != doc[0]))
        others = [o for o in others if o != span]
        choices = [span, *(others[i] for i in rng.choice(len(others), 3, replace=False))]
        order = rng.permutation(4)
        rows.append({"context": " ".join(map(str, doc[:4])), "choices": [choices[i] for i in order],
                     "answer": int(np.flatnonzero(order == 0)[0])})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    write_synthetic()
