"""Trains the tabular fixtures and records the training libraries' own predictions.

Run by hand when the fixtures change (CI only reads what this writes):
    pip install xgboost-cpu==3.2.0 lightgbm==4.7.0 scikit-learn==1.9.1 skl2onnx==1.20.0 \
        onnxruntime==1.32.0 numpy
    python server/tests/data/make_tabular.py

It also writes the example credit-scoring model, examples/credit-scoring/.

Each model goes to tabular/<name>/ (the folder `kandle-server serve --model` takes) and its
inputs with the expected outputs to tabular/<name>/expected.json. Missing values are NaN in
the inputs and `null` in the JSON.
"""

import json
import pathlib

import lightgbm as lgb
import numpy as np
import xgboost as xgb

OUT = pathlib.Path(__file__).parent / "tabular"
rng = np.random.default_rng(7)


def features(rows, cols, missing=0.1):
    x = rng.normal(size=(rows, cols))
    x[rng.random(size=x.shape) < missing] = np.nan
    return x


def write(name, inputs, outputs, classes, names=None):
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "inputs": [[None if np.isnan(v) else float(v) for v in row] for row in inputs],
        "probabilities": np.asarray(outputs, dtype=np.float64).reshape(len(inputs), -1).tolist(),
        "classes": classes,
    }
    if names:
        record["feature_names"] = names
    (folder / "expected.json").write_text(json.dumps(record) + "\n")
    return folder


def xgboost_binary():
    """Binary, with missing values: saved as JSON and as UBJSON, which must agree."""
    x = features(400, 6)
    y = ((np.nan_to_num(x[:, 0]) + np.nan_to_num(x[:, 1]) * 0.5) > 0).astype(int)
    names = [f"f{i}" for i in range(6)]
    train = xgb.DMatrix(x, label=y, feature_names=names)
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 4, "eta": 0.3, "base_score": 0.3},
        train,
        num_boost_round=25,
    )
    test = features(64, 6, missing=0.2)
    p = booster.predict(xgb.DMatrix(test, feature_names=names))
    p = np.stack([1 - p, p], axis=1)
    folder = write("xgboost-binary", test, p, 2, names)
    booster.save_model(folder / "model.json")
    ubj = write("xgboost-binary-ubj", test, p, 2, names)
    booster.save_model(ubj / "model.ubj")


def xgboost_multiclass():
    """Three classes, a native categorical feature (column 2) and missing values."""
    x = features(600, 4)
    x[:, 2] = rng.integers(0, 5, size=600)
    y = (np.nan_to_num(x[:, 0]) > 0).astype(int) + (x[:, 2] >= 3).astype(int)
    types = ["q", "q", "c", "q"]
    train = xgb.DMatrix(x, label=y, feature_types=types, enable_categorical=True)
    booster = xgb.train(
        {"objective": "multi:softprob", "num_class": 3, "max_depth": 3, "eta": 0.3, "max_cat_to_onehot": 1},
        train,
        num_boost_round=15,
    )
    test = features(64, 4, missing=0.2)
    # Categories seen in training, one never seen (7), and missing ones.
    test[:, 2] = rng.integers(0, 8, size=64)
    test[::9, 2] = np.nan
    p = booster.predict(xgb.DMatrix(test, feature_types=types, enable_categorical=True))
    folder = write("xgboost-multiclass", test, p, 3)
    booster.save_model(folder / "model.json")


def on_thresholds(booster, test):
    """Sets some test values exactly on the model's split thresholds, where f32 rounding
    would send them down the wrong branch."""
    dump = booster.dump_model()
    thresholds = []

    def walk(node):
        if "split_feature" in node:
            if node.get("decision_type") == "<=":
                thresholds.append((node["split_feature"], node["threshold"]))
            walk(node["left_child"])
            walk(node["right_child"])

    for tree in dump["tree_info"]:
        walk(tree["tree_structure"])
    for i, (feature, threshold) in enumerate(thresholds[: len(test)]):
        test[i, feature] = threshold
    return test


def lightgbm_binary():
    """Binary, missing values, a categorical feature (column 3), values on thresholds."""
    x = features(800, 5)
    x[:, 3] = rng.integers(0, 6, size=800)
    y = ((np.nan_to_num(x[:, 0]) * 1.7 + (x[:, 3] % 2)) > 0.5).astype(int)
    names = ["income", "debt_ratio", "age", "region", "tenure"]
    data = lgb.Dataset(x, label=y, feature_name=names, categorical_feature=[3])
    booster = lgb.train(
        {"objective": "binary", "num_leaves": 15, "learning_rate": 0.2, "verbose": -1, "min_data_per_group": 5, "cat_smooth": 1},
        data,
        num_boost_round=30,
    )
    test = features(96, 5, missing=0.2)
    test[:, 3] = rng.integers(-1, 8, size=96)
    test = on_thresholds(booster, test)
    p = booster.predict(test)
    p = np.stack([1 - p, p], axis=1)
    folder = write("lightgbm-binary", test, p, 2, names)
    booster.save_model(folder / "model.txt")


def lightgbm_multiclass():
    x = features(600, 4)
    y = np.digitize(np.nan_to_num(x[:, 0]) + np.nan_to_num(x[:, 1]), [-0.5, 0.5])
    booster = lgb.train(
        {"objective": "multiclass", "num_class": 3, "num_leaves": 7, "verbose": -1},
        lgb.Dataset(x, label=y),
        num_boost_round=20,
    )
    test = on_thresholds(booster, features(64, 4, missing=0.2))
    folder = write("lightgbm-multiclass", test, booster.predict(test), 3)
    booster.save_model(folder / "model.txt")


def sklearn_onnx():
    """A scikit-learn pipeline (imputer, scaler, gradient boosting) exported to ONNX with
    ZipMap off. Expected: onnxruntime's outputs, the runtime kandle embeds; sklearn's own
    (in f64 where ONNX computes in f32) are kept beside them."""
    import onnxruntime
    from skl2onnx import to_onnx
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = features(500, 4)
    y = np.digitize(np.nan_to_num(x[:, 0]) - np.nan_to_num(x[:, 2]), [-0.6, 0.6])
    pipeline = make_pipeline(SimpleImputer(), StandardScaler(), GradientBoostingClassifier(n_estimators=30, max_depth=3))
    pipeline.fit(x, y)
    onx = to_onnx(pipeline, x[:1].astype(np.float32), options={id(pipeline.steps[-1][1]): {"zipmap": False}})
    session = onnxruntime.InferenceSession(onx.SerializeToString())
    test = features(64, 4, missing=0.2)
    p = session.run(["probabilities"], {session.get_inputs()[0].name: test.astype(np.float32)})[0]
    folder = write("sklearn-onnx", test, p, 3)
    record = json.loads((folder / "expected.json").read_text())
    record["sklearn_probabilities"] = pipeline.predict_proba(test).tolist()
    (folder / "expected.json").write_text(json.dumps(record) + "\n")
    (folder / "model.onnx").write_bytes(onx.SerializeToString())
    print("sklearn-onnx: largest difference from sklearn", np.abs(p - pipeline.predict_proba(test)).max())


def credit_scoring():
    """The example: a credit-risk XGBoost model on synthetic applicants, with a manifest
    naming its regions and classes."""
    n = 5000
    income = rng.lognormal(10.5, 0.5, n)
    debt_ratio = rng.beta(2, 5, n)
    age = rng.integers(18, 80, n).astype(float)
    years_employed = rng.exponential(6, n)
    region = rng.integers(0, 4, n).astype(float)
    years_employed[rng.random(n) < 0.1] = np.nan
    risk = 3 * debt_ratio - np.log(income) / 4 - age / 60 + (region == 2) * 0.4
    risk -= np.nan_to_num(years_employed, nan=2) / 10
    y = (risk + rng.normal(0, 0.3, n) > np.quantile(risk, 0.8)).astype(int)
    x = np.stack([income, debt_ratio, age, years_employed, region], axis=1)
    names = ["income", "debt_ratio", "age", "years_employed", "region"]
    train = xgb.DMatrix(x, label=y, feature_names=names, feature_types=["q", "q", "q", "q", "c"], enable_categorical=True)
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 4, "eta": 0.2}, train, num_boost_round=60)
    folder = pathlib.Path(__file__).parents[3] / "examples" / "credit-scoring"
    folder.mkdir(exist_ok=True)
    booster.save_model(folder / "model.json")
    manifest = {
        "labels": ["repaid", "defaulted"],
        "categories": {"region": ["north", "south", "east", "west"]},
    }
    (folder / "kandle-tabular.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    xgboost_binary()
    xgboost_multiclass()
    lightgbm_binary()
    lightgbm_multiclass()
    credit_scoring()
    sklearn_onnx()
