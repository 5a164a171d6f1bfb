"""Datasets and the input pipeline (SPEC.md §4).

- `builders`: TFDS builders (coco_inpaint, openimages_inpaint, text_image_pairs,
  synthetic_shapes) writing ArrayRecord, no TensorFlow; `prepare` is their command line.
- `pipeline`: the grain pipeline -> host-local numpy batches (`make_iterator`, `batch_spec`).
- `geometry`: one example's mask augmentation, resize, crop and model inputs.
- `synthetic`: the generated shapes and colour checks; `records`: the stored record format.
- `eval_examples`: the examples `catflax.evaluate` scores, at the model resolution.
"""
