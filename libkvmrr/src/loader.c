/* loader.c - copy an ELF64 x86-64 executable's PT_LOAD segments into guest RAM. */
#include <elf.h>
#include <string.h>

#include "internal.h"

int elf_load(uint8_t *mem, uint64_t mem_size, const uint8_t *elf, size_t len,
             uint64_t *entry, char *err, size_t err_len)
{
    if (len < sizeof(Elf64_Ehdr) || memcmp(elf, ELFMAG, SELFMAG) != 0)
        return ERRF(err, err_len, "guest image is not an ELF file");
    const Elf64_Ehdr *eh = (const Elf64_Ehdr *)elf;
    if (eh->e_ident[EI_CLASS] != ELFCLASS64 || eh->e_machine != EM_X86_64)
        return ERRF(err, err_len, "guest image is not an ELF64 x86-64 file");
    if (eh->e_type != ET_EXEC)
        return ERRF(err, err_len, "guest image must be a static executable (ET_EXEC)");
    if (eh->e_phoff > len || eh->e_phnum > (len - eh->e_phoff) / sizeof(Elf64_Phdr))
        return ERRF(err, err_len, "guest image is truncated (program headers)");
    int loaded = 0;
    for (int i = 0; i < eh->e_phnum; i++) {
        const Elf64_Phdr *ph = (const Elf64_Phdr *)(elf + eh->e_phoff) + i;
        if (ph->p_type != PT_LOAD)
            continue;
        if (ph->p_filesz > ph->p_memsz || ph->p_offset > len || ph->p_filesz > len - ph->p_offset)
            return ERRF(err, err_len, "guest image is truncated (segment %d)", i);
        if (ph->p_paddr < KVMRR_LOAD_MIN || ph->p_memsz > mem_size
            || ph->p_paddr > mem_size - ph->p_memsz)
            return ERRF(err, err_len, "segment %d at 0x%llx+0x%llx lies outside guest RAM "
                        "[0x%x, 0x%llx)", i, (unsigned long long)ph->p_paddr,
                        (unsigned long long)ph->p_memsz, KVMRR_LOAD_MIN,
                        (unsigned long long)mem_size);
        memcpy(mem + ph->p_paddr, elf + ph->p_offset, ph->p_filesz);
        memset(mem + ph->p_paddr + ph->p_filesz, 0, ph->p_memsz - ph->p_filesz);
        loaded++;
    }
    if (!loaded)
        return ERRF(err, err_len, "guest image has no loadable segment");
    if (eh->e_entry < KVMRR_LOAD_MIN || eh->e_entry >= mem_size)
        return ERRF(err, err_len, "entry point 0x%llx outside guest RAM",
                    (unsigned long long)eh->e_entry);
    *entry = eh->e_entry;
    return 0;
}
