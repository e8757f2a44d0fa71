/* triple: IDT with limit 0, then ud2: #UD -> #DF -> triple fault (shutdown). */
#include "rt.h"

void guest_main(const struct hvm_start_info *si)
{
    (void)si;
    puts("triple fault next\n");
    lidt_raw(0, 0);
    __asm__ volatile("ud2" ::: "memory");
    puts("survived\n");
    reset();
}
