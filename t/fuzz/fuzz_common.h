/*
 * Copyright (C) ngx_anythingllm authors
 *
 * Shared pieces of the fuzz targets.
 */


#ifndef _FUZZ_COMMON_H_INCLUDED_
#define _FUZZ_COMMON_H_INCLUDED_


#include <string.h>
#include <time.h>

#include "alm_core.h"


/* the completion a translated answer is reported as */

static inline void
fuzz_meta(alm_completion_meta_t *meta, const char *id, const char *model,
    time_t created)
{
    meta->id = id;
    meta->id_len = strlen(id);
    meta->model = model;
    meta->model_len = strlen(model);
    meta->created = created;
}


#endif /* _FUZZ_COMMON_H_INCLUDED_ */
