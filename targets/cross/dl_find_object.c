/* _dl_find_object for static musl executables, linked into the self-contained libunwind.a that
 * targets/cross/lib.sh assembles from gcc's libgcc_eh.a.
 *
 * Debian's gcc 12 cross compilers are built for glibc >= 2.35, so their libgcc_eh.a looks up a
 * PC's unwind tables with glibc's _dl_find_object (unwind-dw2-fde-dip.c), which musl does not
 * have: any Rust program that unwinds or takes a backtrace (test binaries, panic messages with
 * RUST_BACKTRACE) would fail to link. This gives the same answer through dl_iterate_phdr, which
 * musl has (static executables included). Layout and meaning: glibc's <dlfcn.h> and
 * <bits/dl_find_object.h> (aarch64: no eh_dbase, no eh_count, segment PT_GNU_EH_FRAME; arm: an
 * eh_count, segment PT_ARM_EXIDX).
 */
#include <link.h>
#include <stddef.h>
#include <stdint.h>

#ifndef PT_ARM_EXIDX
#define PT_ARM_EXIDX 0x70000001
#endif

struct dl_find_object {
    unsigned long long dlfo_flags;
    void *dlfo_map_start;
    void *dlfo_map_end;
    void *dlfo_link_map;
    void *dlfo_eh_frame;
#if defined(__arm__)
    int dlfo_eh_count;
#endif
    unsigned long long __dlfo_reserved[7];
};

struct lookup {
    uintptr_t pc;
    struct dl_find_object *result;
    int found;
};

static int visit(struct dl_phdr_info *info, size_t size, void *data)
{
    struct lookup *lookup = data;
    uintptr_t start = UINTPTR_MAX, end = 0;
    const ElfW(Phdr) *eh = NULL;
    int contains = 0;
    (void)size;
    for (size_t i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        uintptr_t lo = info->dlpi_addr + ph->p_vaddr;
        if (ph->p_type == PT_LOAD) {
            if (lo < start) start = lo;
            if (lo + ph->p_memsz > end) end = lo + ph->p_memsz;
            if (lookup->pc >= lo && lookup->pc < lo + ph->p_memsz) contains = 1;
        }
#if defined(__arm__)
        if (ph->p_type == PT_ARM_EXIDX) eh = ph;
#else
        if (ph->p_type == PT_GNU_EH_FRAME) eh = ph;
#endif
    }
    if (!contains) return 0;
    lookup->result->dlfo_flags = 0;
    lookup->result->dlfo_map_start = (void *)start;
    lookup->result->dlfo_map_end = (void *)end;
    lookup->result->dlfo_link_map = NULL;
    lookup->result->dlfo_eh_frame = eh ? (void *)(info->dlpi_addr + eh->p_vaddr) : NULL;
#if defined(__arm__)
    lookup->result->dlfo_eh_count = eh ? (int)(eh->p_memsz / 8) : 0;
#endif
    lookup->found = 1;
    return 1;
}

int _dl_find_object(void *pc, struct dl_find_object *result)
{
    struct lookup lookup = { (uintptr_t)pc, result, 0 };
    dl_iterate_phdr(visit, &lookup);
    return lookup.found ? 0 : -1;
}
