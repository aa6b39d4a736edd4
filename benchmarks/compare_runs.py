"""Compares two outputs of benchmarks/equivalence.sh: every NIfTI file (identical or the
largest difference), the training losses per checkpoint interval, and the checkpoint arrays.

    python benchmarks/compare_runs.py BEFORE AFTER
"""
import csv
import glob
import os
import sys

import h5py
import nibabel as nib
import numpy as np

a, b = sys.argv[1], sys.argv[2]
files = sorted(glob.glob(f"{a}/*.nii.gz") + glob.glob(f"{a}/*/*.nii.gz"))
for f in files:
    g = f.replace(a, b)
    x, y = nib.load(f), nib.load(g)
    X, Y = np.asarray(x.dataobj), np.asarray(y.dataobj)
    same = np.array_equal(X, Y) and np.allclose(x.affine, y.affine, atol=0)
    print(f"{os.path.relpath(f, a)}: {'identical' if same else 'DIFFERENT max|d|=%g' % np.abs(X.astype(float)-Y.astype(float)).max()}")
ra = list(csv.DictReader(open(f"{a}/run/log.csv"))); rb = list(csv.DictReader(open(f"{b}/run/log.csv")))
keys = ["reg_loss", "reg_similarity", "reg_smoothness", "reg_anatomy", "seg_loss", "seg_supervised", "seg_anatomy"]
print("epoch (5 steps each): " + "  ".join(keys))
worst = 0
for x, y in zip(ra, rb):
    print("before", x["epoch"], " ".join(f"{float(x[k]):.9g}" for k in keys))
    print("after ", y["epoch"], " ".join(f"{float(y[k]):.9g}" for k in keys))
    worst = max(worst, max(abs(float(x[k]) - float(y[k])) for k in keys))
print("largest loss difference", worst)
def weights(path):
    import zipfile, io
    with zipfile.ZipFile(path) as z:
        data = z.read("model.weights.h5")
    h = h5py.File(io.BytesIO(data), "r"); out = {}
    h.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out
wa, wb = weights(f"{a}/run/checkpoint.keras"), weights(f"{b}/run/checkpoint.keras")
diff = max(float(np.abs(np.asarray(wa[k], float) - np.asarray(wb[k], float)).max()) for k in wa)
print("checkpoint arrays", len(wa), "same names", set(wa) == set(wb), "max |difference|", diff)
