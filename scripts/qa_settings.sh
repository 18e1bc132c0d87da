# Sourced by the scripts that add rows to the recall, multi-query and needle tables: the settings of
# scripts/recall_table.sh, scripts/multi_query_table.sh and scripts/needle_table.sh (same episodes, same token ids
# as kvpress), at 50 / 25 / 12.5 % KV kept; results into runs/recall, runs/multi and runs/needle.
# shellcheck disable=SC2034  # read by the sourcing script
budgets=(--kv-budget 0.5 0.25 0.125)
recall=(--task qa --data recall --episodes 30 --out-dir runs/recall)
multi=(--task qa --data recall --episodes 30 --questions 4 --out-dir runs/multi)
needle=(--task needle --needle-lengths 512 1024 --needle-depths 0 0.5 1 --docs 2 --out-dir runs/needle)
