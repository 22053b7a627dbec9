# Installs the public headers under <prefix>/include/duplex/, with the tree's root-relative includes
# ("comm/communicator.hpp") rewritten to the installed names ("duplex/comm/communicator.hpp"), so that a
# consumer's include path holds nothing of Duplex's but the duplex/ folder. Run by `cmake --install`.
set(dest "$ENV{DESTDIR}${CMAKE_INSTALL_PREFIX}/include/duplex")
foreach(dir core comm kernels memory parallel runtime)
    file(GLOB_RECURSE headers RELATIVE "${DUPLEX_SOURCE_DIR}" "${DUPLEX_SOURCE_DIR}/${dir}/*.hpp"
         "${DUPLEX_SOURCE_DIR}/${dir}/*.cuh")
    foreach(h IN LISTS headers)
        file(READ "${DUPLEX_SOURCE_DIR}/${h}" text)
        string(REGEX REPLACE "#include \"(core|comm|kernels|memory|parallel|runtime)/" "#include \"duplex/\\1/" text
               "${text}")
        get_filename_component(folder "${dest}/${h}" DIRECTORY)
        file(MAKE_DIRECTORY "${folder}")
        file(WRITE "${dest}/${h}" "${text}")
    endforeach()
endforeach()
message(STATUS "Installed Duplex headers: ${dest}")
