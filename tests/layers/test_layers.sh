#!/bin/sh
# Calls go down the layer table of docs/ARCHITECTURE.md ("Layers and what each may include"),
# never up: the utilities, typed weights, file formats / model / forward pass and the backends
# include no header of the adapters, engine, training or server (the forward knows adapters only
# as the step's plan, include/ds/plan.h). Usage: test_layers.sh REPO_ROOT
root=${1:?usage: test_layers.sh REPO_ROOT}
cd "$root" || exit 2
lower="src/util src/quant src/format src/tokenizer src/model src/backend cuda include/ds/common.h include/ds/weight.h include/ds/backend.h
       include/ds/backend_train.h include/ds/batch.h include/ds/plan.h include/ds/model.h include/ds/tokenizer.h"
upper='#include "(ds/(adapter|engine|train|server)\.h|(adapter|engine|train|server)/)'
# shellcheck disable=SC2086
hits=$(grep -rnE "$upper" $lower --include='*.c' --include='*.h' --include='*.cu' --include='*.cuh')
if [ -n "$hits" ]; then
    echo "an include goes up the layer table:"
    echo "$hits"
    exit 1
fi
echo "layers: no include from model, backend, quant or util goes up"
