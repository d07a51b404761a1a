"""The bad inputs of test_bad_input.py: one row per input, with the job it is given to
and what the job's message must say."""

# The user's own model (a checkpoint loaded by my_pkg.models.load: layers fc1, act, out)
# and datasets, small; `{ckpt}` and `{case}` are filled in per row.
USER_MODEL = ("model=custom", "model._target_=my_pkg.models.load", "+model.path={ckpt}")
USER = (
    *USER_MODEL,
    "data=custom",
    "data.train._target_=my_pkg.data.train_set",
    "+data.train.n=90",
    "data.query._target_=my_pkg.data.queries",
    "+data.query.n=12",
    "index.shard_size=32",
    "compression.k=32",
    "cluster.num_workers=1",
)


# (job, overrides, what the message must say)
CASES = {
    # precondition
    "damping_nan": (
        "attribute",
        ("precondition.damping=nan",),
        r"precondition\.damping=nan must be a finite",
    ),
    "damping_inf": (
        "attribute",
        ("precondition.damping=inf",),
        r"precondition\.damping=inf must be a finite",
    ),
    "damping_negative": (
        "attribute",
        ("precondition.damping=-1",),
        r"precondition\.damping must be >= 0",
    ),
    "damping_word": (
        "score",
        ("precondition.damping=big",),
        r"precondition\.damping='big' must be a number >= 0 or 'auto'",
    ),
    "grid_zero": (
        "attribute",
        ("precondition.damping=auto", "precondition.grid=[0.1,0]"),
        r"precondition\.grid must list positive",
    ),
    "grid_nan": (
        "attribute",
        ("precondition.damping=auto", "precondition.grid=[0.1,nan]"),
        r"precondition\.grid\[1\]=nan must be a finite",
    ),
    "precondition_name_path": (
        "score",
        ("precondition.name=../fisher",),
        r"precondition\.name='\.\./fisher' must name a single folder",
    ),
    # compression
    "k_zero": ("index", ("compression.k=0",), r"compression\.k=0 must be a positive integer"),
    "mask_out_negative": (
        "attribute",
        ("compression.mask_out=-5",),
        r"compression\.mask_out=-5 must be a positive size",
    ),
    "proj_in_zero": (
        "attribute",
        ("compression=logra", "compression.proj_out=4", "compression.proj_in=0"),
        r"compression\.proj_in=0 must be a positive size",
    ),
    "unknown_method": (
        "attribute",
        ("compression.method=fastgrass",),
        r"compression\.method='fastgrass' is unknown",
    ),
    "factorised_other": (
        "index",
        ("compression.other=factgrass",),
        r"compression\.other='factgrass' is factorised",
    ),
    "k_above_layer_switch_off": (
        "attribute",
        ("compression.k=5000", "++compression.whole_small_layers=false"),
        r"compression\.k=5000 is larger than layer 'fc1'.*compression\.whole_small_layers=true",
    ),
    "masks_below_k": (
        "index",
        ("compression.k=64", "compression.mask_out=2", "compression.mask_in=2"),
        r"layer 'fc1': k=64 exceeds the masked size 2x2=4",
    ),
    "selective_masks_below_k": (
        "index",
        (
            "compression=selective_factgrass",
            "compression.k=64",
            "compression.mask_out=2",
            "compression.mask_in=2",
        ),
        r"layer 'fc1': k=64 exceeds the masked size 2x2=4",
    ),
    "min_spearman_2": (
        "index",
        ("compression.selective.min_spearman=2",),
        r"compression\.selective\.min_spearman=2\.0 is not a Spearman",
    ),
    # index
    "layers_empty": ("attribute", ("index.layers=[]",), r"index\.layers=\[\] names no layer"),
    "layers_twice": (
        "index",
        ("index.layers=[fc1,fc1]",),
        r"index\.layers names \['fc1'\] more than once",
    ),
    "layers_unknown": (
        "attribute",
        ("index.layers=[fc9]",),
        r"index\.layers names 'fc9', which is not a module",
    ),
    "layers_no_parameters": (
        "attribute",
        ("index.layers=[act]",),
        r"index\.layers names 'act', a ReLU without parameters",
    ),
    "dtype_typo": ("index", ("index.dtype=float64",), r"index\.dtype='float64'; choose float32"),
    "shard_size_zero": ("index", ("index.shard_size=0",), r"index\.shard_size must be positive"),
    "index_url_empty": ("index", ("index.url=''",), r"index\.url is empty"),
    # run and store
    "run_name_parent": (
        "attribute",
        ("run.name=../x",),
        r"run\.name='\.\./x' must name a single folder",
    ),
    "run_name_empty": ("score", ("run.name=''",), r"run\.name='' must name a single folder"),
    "store_url_empty": ("attribute", ("store.url=''",), r"store\.url is empty"),
    "store_url_a_file": (
        "index",
        ("store.url={case}/a_file",),
        r"index store .*/a_file is a file, not a folder\. Fix: set store\.url",
    ),
    "store_protocol_unknown": (
        "index",
        ("store.url=nosuch://bucket/index",),
        r"unavailable: cannot create filesystem.*store\.url",
    ),
    "store_in_memory": ("index", ("store.url=memory://idx",), r"one process's memory"),
    "store_retries_negative": (
        "index",
        ("store.retries=-1",),
        r"store\.retries, store\.backoff_s and store\.backoff_max_s must be >= 0",
    ),
    "score_without_index": (
        "score",
        (),
        r"no gradient index at .*Fix: run `python -m jobs\.index` with the same store\.url "
        r"\(or index\.url\) first",
    ),
    # cluster, scoring, ensemble, faults
    "worker_resources_negative": (
        "index",
        ("cluster.worker_resources={slot:-1}",),
        r"cluster\.worker_resources\.slot=-1 must be >= 0",
    ),
    "worker_resources_not_a_map": (
        "index",
        ("cluster.worker_resources=4",),
        r"cluster\.worker_resources=4 must map resource names to amounts",
    ),
    "cpus_per_worker_zero": (
        "attribute",
        ("cluster.cpus_per_worker=0",),
        r"cluster\.cpus_per_worker=0\.0 must be positive",
    ),
    "cpus_per_worker_negative": (
        "index",
        ("cluster.cpus_per_worker=-1",),
        r"cluster\.cpus_per_worker=-1\.0 must be positive",
    ),
    "gpus_per_worker_negative": (
        "attribute",
        ("cluster.gpus_per_worker=-1",),
        r"cluster\.gpus_per_worker=-1\.0 must be >= 0",
    ),
    "num_workers_zero": (
        "index",
        ("cluster.num_workers=0",),
        r"cluster\.num_workers must be at least 1",
    ),
    "num_cpus_zero": ("index", ("cluster.num_cpus=0",), r"cluster\.num_cpus=0 must be at least 1"),
    "placement_timeout_inf": (
        "index",
        ("cluster.placement_timeout_s=inf",),
        r"cluster\.placement_timeout_s=inf must be a finite",
    ),
    "scoring_parallelism_zero": (
        "attribute",
        ("scoring.parallelism=0",),
        r"scoring\.parallelism=0 must be at least 1",
    ),
    "scoring_cpus_nan": (
        "score",
        ("scoring.cpus_per_task=nan",),
        r"scoring\.cpus_per_task=nan must be a finite",
    ),
    "scoring_kind_typo": (
        "attribute",
        ("scoring.kind=dot",),
        r"scoring\.kind='dot'; use influence",
    ),
    "scoring_topk_zero": (
        "attribute",
        ("scoring.topk=0",),
        r"scoring\.topk and scoring\.tile_rows must be positive",
    ),
    "unknown_key": (
        "attribute",
        ("+scoring.topk_k=3",),
        r"config group 'scoring': Key 'topk_k' not in 'ScoringConfig' \(field scoring\.topk_k; "
        r"did you mean scoring\.topk\?\)",
    ),
    "ensemble_size_zero": (
        "attribute",
        ("ensemble.size=0",),
        r"ensemble\.size=0 must be at least 1",
    ),
    "ensemble_member_argument": (
        "attribute",
        ("ensemble.models=[{hidden:24},{hiden:8}]",),
        r"ensemble member 1 .*my_pkg\.models\.load takes no argument hiden",
    ),
    "faults_delay_negative": (
        "index",
        ("faults.shard_delay_s=-1",),
        r"faults\.shard_delay_s must be >= 0",
    ),
    # lds
    "lds_subsets_one": ("lds", ("lds.subsets=1",), r"lds\.subsets must be >= 2"),
    "lds_fraction_nan": ("lds", ("lds.fraction=nan",), r"lds\.fraction=nan must be a finite"),
    "lds_results_path": (
        "lds",
        ("lds.results=[a/b]",),
        r"lds\.results\[0\]='a/b' must name a single folder",
    ),
    # service
    "serve_port_zero": ("serve", ("serve.port=0",), r"serve\.port=0 is not a TCP port"),
    "serve_topk_above_max": (
        "serve",
        ("serve.topk=50", "serve.max_topk=10"),
        r"serve\.topk=50 exceeds serve\.max_topk=10",
    ),
    "serve_prefix": (
        "serve",
        ("serve.route_prefix=api",),
        r"serve\.route_prefix='api' must start with '/'",
    ),
    "serve_cpus_nan": (
        "serve",
        ("serve.cpus_per_replica=nan",),
        r"serve\.cpus_per_replica=nan must be a finite",
    ),
    "serve_host_empty": (
        "serve",
        ("serve.host=''",),
        r"serve\.host and serve\.app_name must not be empty",
    ),
    # the user's own model, task and data
    "train_set_empty": (
        "attribute",
        ("data.train.n=0",),
        r"data\.train\._target_='my_pkg\.data\.train_set' built an empty dataset",
    ),
    "query_set_empty": (
        "attribute",
        ("data.query.n=0",),
        r"data\.query\._target_='my_pkg\.data\.queries' built an empty dataset",
    ),
    "query_set_empty_score": (
        "score",
        ("data.query.n=0",),
        r"data\.query\._target_='my_pkg\.data\.queries' built an empty dataset",
    ),
    "query_missing": (
        "attribute",
        ("data.query=null",),
        r"data\.query is not configured; set data\.query\._target_",
    ),
    "train_not_a_dataset": (
        "index",
        ("data.train._target_=my_pkg.tasks.SmoothedCE", "~data.train.n"),
        r"data\.train\._target_='my_pkg\.tasks\.SmoothedCE' returned an object of type "
        r"SmoothedCE, not a map-style dataset",
    ),
    "items_do_not_fit_the_task": (
        "index",
        (
            "task=custom",
            "task._target_=my_pkg.tasks.SmoothedCE",
            "data.train._target_=my_pkg.data.dicts",
        ),
        r"row 0 of data\.train does not fit task\._target_='my_pkg\.tasks\.SmoothedCE'.*Attribute",
    ),
    "train_target_missing": (
        "index",
        ("~data.train._target_",),
        r"'data\.train' needs a '_target_'",
    ),
    "model_module_missing": (
        "attribute",
        ("model._target_=my_pkg.nope.load",),
        r"model\._target_='my_pkg\.nope\.load' cannot be imported \(ModuleNotFoundError: No "
        r"module named 'my_pkg\.nope'\); check the import path",
    ),
    "model_module_needs_a_missing_package": (
        "index",
        ("model._target_=my_pkg.plots.model",),
        r"model\._target_='my_pkg\.plots\.model' cannot be imported: its code imports "
        r"'seaborn_for_plots', which is not installed in this environment \(ModuleNotFound"
        r"Error: No module named 'seaborn_for_plots'\); install it \(e\.g\. pip install "
        r"seaborn_for_plots\) where the job runs, on every node$",
    ),
    "model_attribute_misspelt": (
        "attribute",
        ("model._target_=my_pkg.models.laod",),
        r"model\._target_='my_pkg\.models\.laod' cannot be imported: module my_pkg\.models has "
        r"no attribute laod \(did you mean load\?\); fix the name, e\.g\. "
        r"model\._target_=my_pkg\.models\.load$",
    ),
    "model_attribute_missing": (
        "index",
        ("model._target_=my_pkg.models.nope",),
        r"model\._target_='my_pkg\.models\.nope' cannot be imported: module my_pkg\.models has "
        r"no attribute nope \(its callables: (\w+, )*build, (\w+, )*load(, \w+)*\); set "
        r"model\._target_ to one of them, or define nope in my_pkg\.models$",
    ),
    "key_added_at_the_top": (
        "attribute",
        ("+topk=3",),
        r"topk is not a setting of grass_dist \(did you mean scoring\.topk or serve\.topk\?\).*"
        r"new keys are not accepted",
    ),
    "key_added_to_a_group": (
        "attribute",
        ("+cluster.num_worker=3",),
        r"Key 'num_worker' not in 'ClusterConfig' \(field cluster\.num_worker; did you mean "
        r"cluster\.num_workers",
    ),
    "model_checkpoint_missing": (
        "attribute",
        ("model.path={case}/nope.pt",),
        r"could not build 'model' from _target_='my_pkg\.models\.load': FileNotFoundError: "
        r".*No such file or directory: '[^']*/nope\.pt'\. The call raised it: check the "
        r"arguments under 'model' \(path\)",
    ),
    "model_not_a_module": (
        "attribute",
        ("model._target_=my_pkg.data.train_set", "~model.path"),
        r"model\._target_='my_pkg\.data\.train_set' returned an object of type TensorDataset, "
        r"not a torch nn\.Module",
    ),
    "model_weights_nan": (
        "index",
        ("model._target_=my_pkg.models.diverged",),
        r"model\._target_='my_pkg\.models\.diverged' has NaN or inf weights in fc1\.weight, "
        r"out\.bias: .*Fix: load the checkpoint you mean to attribute.*training diverged",
    ),
    "task_not_a_task": (
        "attribute",
        ("task=custom", "task._target_=my_pkg.data.train_set"),
        r"task\._target_='my_pkg\.data\.train_set' returned an object of type TensorDataset "
        r"without collate, to, per_sample_loss",
    ),
}


# Rows refused by the model, data and store checks that also run on the embedded default.
EMBEDDED = ("model_not_a_module", "train_set_empty", "store_protocol_unknown")
