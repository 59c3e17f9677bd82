# Shared by the bin/ step scripts (sourced, not run).

# The shard of this task as K/N: $SHARD when set, else from a Slurm array task's environment
# (task ids need not start at 0: --array=1-4 gives shards 0/4 .. 3/4); empty when neither.
umx_shard() {
    if [ -n "${SHARD:-}" ]; then
        echo "$SHARD"
    elif [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
        echo "$(( SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0} ))/${SLURM_ARRAY_TASK_COUNT:?}"
    fi
}

# The file one shard writes for OUT: out.h5 -> out.shard-2-of-4.h5 (shard "2/4").
umx_shard_path() {
    local out=$1 shard=$2 stem ext
    ext=${out##*.}
    stem=${out%.*}
    [ "$stem" = "$out" ] && ext="" || ext=".$ext"
    echo "${stem}.shard-${shard%/*}-of-${shard#*/}${ext}"
}

UMX=${UMX:-umxtools}
