#!/usr/bin/env bash
# Entrypoint of the lamost-mdwarf image (installed as /usr/local/bin/lamost-mdwarf-entrypoint).
#
#   docker run IMAGE run --spectra ...          -> lamost-mdwarf run --spectra ...
#   docker run IMAGE lamost-mdwarf run ...      -> lamost-mdwarf run ...
#   docker run IMAGE dask worker tcp://...      -> dask worker tcp://...
#   docker run IMAGE dask-worker tcp://...      -> dask worker tcp://...  (also dask-scheduler)
#
# The dask-kubernetes operator starts scheduler and worker pods with the container
# arguments "dask-scheduler ..." / "dask-worker ...", commands that recent releases of
# distributed no longer install; they are mapped to "dask scheduler" / "dask worker".
set -euo pipefail

case "${1:-}" in
    dask-scheduler)
        shift
        exec dask scheduler "$@"
        ;;
    dask-worker)
        shift
        exec dask worker "$@"
        ;;
    lamost-mdwarf | dask | python | python3 | bash | sh)
        exec "$@"
        ;;
    *)
        exec lamost-mdwarf "$@"
        ;;
esac
